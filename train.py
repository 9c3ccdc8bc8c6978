"""Worker entry point, started once per rank by `deepy.py` (through DeepSpeed's runner).

    python deepy.py train.py configs/tiny_cpu.yml configs/demo.yml

Each worker reads the resolved config that deepy.py validated and wrote; nothing is re-derived from the command line.
"""

import os
import sys
import warnings

# megatron-core announces its fallbacks (no Transformer Engine / Apex) once per import; they are expected here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron.parallel.launch_env import map_launcher_env  # noqa: E402

try:
    map_launcher_env()  # srun / mpirun give their own rank variables: map them before anything reads RANK
except RuntimeError as err:
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)

from megatron.config.errors import ConfigError  # noqa: E402
from megatron.config.loader import entry_parser, load_resolved  # noqa: E402
from megatron.checkpoint.manager import CheckpointMismatchError  # noqa: E402
from megatron.data.indexed_dataset import CorruptDatasetError  # noqa: E402
from megatron.trainer import Trainer, TrainingDiverged  # noqa: E402


def main() -> None:
    parser = entry_parser(__doc__)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    args = parser.parse_args()
    world = int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE") else None
    try:
        cfg = load_resolved(args.config, world_size=world)
    except ConfigError as e:  # rules that need the real world size (deepy.py could not know it)
        print(e.format(f"the {world or 1} ranks launched stop before training"), file=sys.stderr, flush=True)
        sys.exit(2)
    rank = int(os.environ.get("RANK", 0))
    try:
        Trainer(cfg, args.run_dir).fit()
    except (CheckpointMismatchError, CorruptDatasetError) as e:
        # A user error: say what and how to fix it, without a traceback. Checkpoint checks run on every rank
        # with the same result, so rank 0 alone says it; a data file is opened by every rank too.
        if rank == 0 or not getattr(e, "all_ranks", True):
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingDiverged:  # already explained in the log
        sys.exit(3)
    except Exception as e:
        if _peer_failure(e):  # the rank that failed printed its own error: no second traceback from this one
            print(f"rank {rank}: stopping, another rank failed (its error is above)", file=sys.stderr, flush=True)
            sys.exit(1)
        raise


def _peer_failure(e: BaseException) -> bool:
    """True for the errors a collective raises on the healthy ranks when another rank's process is gone."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistBackendError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                            "recvBytes", "Socket Timeout", "NCCL communicator was aborted"))


def exit_without_teardown() -> None:
    """End a finished run now: the atexit handlers run (logging, multiprocessing's children, the libraries' own),
    but not the interpreter's teardown of the torch / megatron-core / DeepSpeed modules, which takes about a second
    of CPU per rank and delays every job's exit for nothing. Skipped while a non-daemon thread still works: a normal
    exit waits for it."""
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_without_teardown()
