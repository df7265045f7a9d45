"""The exit codes a training process ends with. No torch import: the launcher (cluster/launch.py) and the
SLURM script's wrapper read them without paying for one."""

DONE = 0
CRASH = 1  # an unexpected error (with its traceback), or a rank that lost a peer
BAD_INPUT = 2  # a one-line error about the config, the data, a checkpoint or the run dir: fix it, then rerun
# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". Distinct from the
# codes above so that a script can requeue on exactly this code (preempted: the last step is checkpointed).
REQUEUE_EXIT_CODE = 75
