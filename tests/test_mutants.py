"""scripts/mutants.py --per-module: which test files are a mutated file's own, read from a small
repository written here (every way a test can name a module, a script or a config)."""
import importlib.util
import os

import pytest

from tests.conftest import REPO

FILES = {
    "mbn/__init__.py": "from mbn import naming\n",
    "mbn/naming.py": "",
    "mbn/step.py": "",
    "mbn/norms/__init__.py": "from mbn.norms.base import recording\nfrom mbn.norms.registry import NORMS\n",
    "mbn/norms/base.py": "def recording():\n    pass\n",
    "mbn/norms/registry.py": "NORMS = {}\n",
    "mbn/norms/bn.py": "class BatchNorm2d:\n    pass\n",
    "models/__init__.py": "from models.nin import nin\n",
    "models/nin.py": "def nin():\n    pass\n",
    "train.py": "",
    "scripts/bench.py": "",
    "configs/train.yaml": "defaults:\n  - norm: bn\n  - data: cifar10\n  - experiment: null\n",
    "configs/norm/bn.yaml": "", "configs/norm/gn.yaml": "", "configs/norm/mbn.yaml": "",
    "configs/data/cifar10.yaml": "", "configs/data/synthetic.yaml": "",
    "configs/experiment/smoke.yaml": "defaults:\n  - override /data: synthetic   # CIFAR-shaped\n",
    "tests/conftest.py": 'TINY = ["experiment=smoke"]\n\n\ndef make_cfg(overrides=()):\n    pass\n',
    "tests/test_a.py": "from mbn.norms import recording\n",
    "tests/test_b.py": "from mbn import norms\n\n\ndef test():\n    norms.bn.BatchNorm2d, norms.NORMS\n",
    "tests/test_c.py": "def test():\n    import mbn.step as step\n",
    "tests/test_step.py": "",
    "tests/test_d.py": ("from tests.conftest import TINY, make_cfg\n\n\ndef test(norm):\n"
                        "    make_cfg(TINY + [f'norm={norm}'])\n"),
    "tests/test_e.py": "def test(run_cli):\n    run_cli('train.py', 'norm=gn,mbn')\n",
    "tests/test_f.py": "import models\n",
    "tests/test_g.py": "import os\n\n\ndef test():\n    os.path.join('scripts', 'bench.py')\n",
    "scripts/plot.py": "",
    "tests/test_h.py": "def script(name):\n    pass\n\n\ndef test():\n    script('plot')\n    'x'.startswith('bench')\n",
}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("mutants", os.path.join(REPO, "scripts", "mutants.py"))
    mutants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutants)
    root = tmp_path_factory.mktemp("repo")
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return mutants.TestIndex(str(root))


@pytest.mark.parametrize("path,tests", [
    ("mbn/norms/base.py", ["a"]),           # a name its package re-exports
    ("mbn/norms/registry.py", ["b"]),       # an attribute of the imported package, re-exported
    ("mbn/norms/bn.py", ["b"]),             # an attribute chain naming the submodule
    ("mbn/step.py", ["step", "c"]),         # its own test file first, then an import inside a function
    ("mbn/naming.py", ["b"]),               # named by no test: the tests of the package importing it
    ("models/nin.py", ["f"]),
    ("train.py", ["e"]),                    # run by name
    ("scripts/bench.py", ["g"]),            # named in pieces (a method's argument 'bench' names nothing)
    ("scripts/plot.py", ["h"]),             # its stem passed to a loader: script('plot')
    ("configs/norm/gn.yaml", ["d", "e"]),   # f"norm={...}" may be any; 'norm=gn,mbn' a multirun
    ("configs/norm/mbn.yaml", ["d", "e"]),
    ("configs/norm/bn.yaml", ["d", "e"]),   # the default: every test that composes
    ("configs/data/synthetic.yaml", ["d"]),  # picked by the experiment TINY composes
    ("configs/data/cifar10.yaml", ["d", "e"]),
    ("configs/train.yaml", ["d", "e"]),
])
def test_own_tests_of_a_file(index, path, tests):
    assert index.tests_for(path) == tuple(f"tests/test_{t}.py" for t in tests)


def test_a_mistake_in_the_command_is_one_line(capsys):
    """mutants.py ends a usage mistake like every script (mbn.cli): a UserError, exit status 2."""
    from mbn import UserError

    spec = importlib.util.spec_from_file_location("mutants", os.path.join(REPO, "scripts", "mutants.py"))
    mutants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutants)
    for argv, says in ((["--list", "--only", "nope"], "--only: unknown mutants nope; see --list"),
                       (["--list", "--tests", "a", "--per-module"], "give one of them"),
                       (["--bogus"], "unrecognized arguments: --bogus")):
        with pytest.raises(UserError, match=says) as e:
            mutants.main(argv)
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert capsys.readouterr().err == ""  # no argparse usage block
