"""Test driver (plain python, one rank): train a few steps, then, one file of the newest checkpoint
at a time, plant a pickle payload that would create MARKER if anything unpickled it as code, update
that file's sha256 in metadata.json (as an attacker with write access would), and resume the same
trainer from it. Prints one `TAMPER <json>` line per file: whether the resume loaded or refused, its
message, and whether the marker appeared. The pristine checkpoint is put back between files; with
`--leave NAME` that file stays planted at the end (for a resume through pretrain/main.py).

  python tests/drivers/tamper_resume.py MARKER [--leave NAME] --config FILE [overrides]
"""
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


class Payload:
    """Unpickled as code, this runs `touch MARKER`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _planted_torch_file(data: bytes, marker: str) -> bytes:
    """A torch.save file holding the payload before the original content (read first on load)."""
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)  # our own pristine file
    buf = io.BytesIO()
    torch.save({"__payload__": Payload(marker), **obj} if isinstance(obj, dict) else [Payload(marker), obj], buf)
    return buf.getvalue()


def _plant_distcp(step_dir: Path, rel: str, marker: str, kind: str) -> list[str]:
    """Replace the first stored item of `kind` (bytes: a pickled Python value such as an optimizer
    hyper-parameter; tensor) inside a DCP data file by a torch.save'd payload, and rewrite the offsets
    in `.metadata` to match. Returns the files changed."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md_path, data_path = step_dir / rel.rsplit("/", 1)[0] / ".metadata", step_dir / rel
    md = pickle.loads(md_path.read_bytes())  # test code reading the pristine checkpoint it wrote
    blob = data_path.read_bytes()
    name = data_path.name
    items = sorted(((k, v) for k, v in md.storage_data.items() if v.relative_path == name), key=lambda kv: kv[1].offset)
    want = (lambda k: isinstance(md.state_dict_metadata[k.fqn], BytesStorageMetadata)) if kind == "bytes" else \
        (lambda k: not isinstance(md.state_dict_metadata[k.fqn], BytesStorageMetadata))
    target = next(k for k, _ in items if want(k))
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    out, pos = bytearray(), 0
    for key, info in items:
        piece = buf.getvalue() if key == target else blob[info.offset:info.offset + info.length]
        out += blob[pos:info.offset]  # anything between items, kept
        pos = info.offset + info.length
        info.offset, info.length = len(out), len(piece)
        out += piece
    out += blob[pos:]
    data_path.write_bytes(bytes(out))
    md_path.write_bytes(pickle.dumps(md))
    return [rel, rel.rsplit("/", 1)[0] + "/.metadata"]


def plant(step_dir: Path, case: str, marker: str) -> list[str]:
    """Plant a payload for tamper case `case` (a file name, or `<.distcp file>#bytes|#tensor`)."""
    rel, _, kind = case.partition("#")
    path = step_dir / rel
    if kind:
        return _plant_distcp(step_dir, rel, marker, kind)
    data = path.read_bytes()
    if rel.endswith(".pt"):
        path.write_bytes(_planted_torch_file(data, marker))
    elif rel.endswith(".metadata"):  # DCP's own metadata pickle, payload first
        path.write_bytes(pickle.dumps([Payload(marker), pickle.loads(data)]))
    else:  # safetensors, yaml: a bare pickle where the file was
        path.write_bytes(pickle.dumps(Payload(marker)))
    return [rel]


def rehash(step_dir: Path, names: list[str]) -> None:
    meta_path = step_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for rel in names:
        meta["files"][rel] = hashlib.sha256((step_dir / rel).read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta, indent=1))


def cases(meta: dict) -> list[str]:
    out = []
    for rel in sorted(meta["files"]):
        out += [f"{rel}#bytes", f"{rel}#tensor"] if rel.endswith(".distcp") else [rel]
    return out


def main() -> None:
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    marker, args = sys.argv[1], sys.argv[2:]
    leave = None
    if args[0] == "--leave":
        leave, args = args[1], args[2:]
    assert args[0] == "--config", __doc__
    trainer = Trainer(load_config(args[1], args[2:]), config_source=args[1])
    try:
        trainer.train()
        steps = trainer.checkpointer.list_steps()
        step_dir = Path(trainer.checkpointer.step_path(steps[-1]))
        pristine = step_dir.parent.parent / "pristine"
        shutil.copytree(step_dir, pristine)
        todo = cases(json.loads((step_dir / "metadata.json").read_text()))
        if leave:  # planted last, and left so
            todo = [c for c in todo if c != leave] + [leave]
        for case in todo:
            shutil.rmtree(step_dir)
            shutil.copytree(pristine, step_dir)
            rehash(step_dir, plant(step_dir, case, marker))
            try:
                trainer.resume()
                outcome, message = "loaded", ""
            except CheckpointError as e:
                outcome, message = "refused", str(e)
            print("TAMPER " + json.dumps({"case": case, "outcome": outcome, "message": message,
                                          "marker": os.path.exists(marker)}), flush=True)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
