"""Read an offline W&B run file (a LevelDB-style log of protobuf records after a 7-byte header),
so tests can check what a run logged without a W&B server."""
from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    assert len(data) > 7, ("only the header: wandb-core writes the records when it closes the run's stream; "
                           "call wandb.teardown() before reading")
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    return [pb.Record.FromString(r) for r in out]
