"""Errors raised for bad data specifications, and the one-line formatter both CLIs (pretrain.main,
pretrain.evaluate) and the data stream report errors with."""


class DataSpecError(ValueError):
    """A data spec (URLs, manifest, shard count, resume state) cannot be used; the message says why."""


def first_line(err: BaseException) -> str:
    """The message of an error, one line even when a DataLoader worker re-raised it with the worker's
    traceback folded into the text ("Caught X in DataLoader worker process 0. Original Traceback ...")."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in lines[1]:
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else type(err).__name__
