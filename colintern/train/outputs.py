"""A training run's output folder: its files, the newest checkpoint (--resume_ckpt latest), and the rules that
keep an earlier run safe (refused unless resumed or --overwrite, removed only once the new run starts writing)."""
from __future__ import annotations

import logging
from pathlib import Path


from colintern.errors import UserError
from colintern.files import make_output_dir
from colintern.train.state import (LOSS_TXT, METRICS_JSONL)


log = logging.getLogger("colintern.train")


CONFIG_FILE = "train_config.yaml"  # the resolved settings of the newest run in --out_dir (train.py --config re-runs it)


CHECKPOINT_GLOB = "colintern_heads_*.pt"


def run_files(out_dir: Path) -> list[Path]:
    """The files of a training run in out_dir: checkpoints, the two logs and the resolved settings."""
    return sorted(out_dir.glob(CHECKPOINT_GLOB)) + [p for p in (out_dir / LOSS_TXT, out_dir / METRICS_JSONL,
                                                                out_dir / CONFIG_FILE) if p.exists()]


def latest_checkpoint(out_dir: Path) -> Path:
    """The checkpoint written last in out_dir (checkpoints are renamed into place whole, so the newest is the last
    good one)."""
    found = sorted(out_dir.glob(CHECKPOINT_GLOB), key=lambda p: (p.stat().st_mtime_ns, p.name))
    if not found:
        raise UserError(f"--resume_ckpt latest: no {CHECKPOINT_GLOB} in --out_dir {out_dir}")
    return found[-1]


def prepare_out_dir(out_dir_flag: str, resume_ckpt: str | None, overwrite: bool) -> tuple[str | None, list[Path]]:
    """Create --out_dir and resolve --resume_ckpt latest, before any slow work: returns (the checkpoint to resume
    from, the files --overwrite will remove). An earlier run there is refused unless this is a resume (--resume_ckpt)
    or --overwrite; its files are removed only when this run starts writing, so a run that fails before its first
    step leaves the earlier one intact."""
    out_dir = make_output_dir(out_dir_flag, "--out_dir")
    if resume_ckpt == "latest":
        resume_ckpt = str(latest_checkpoint(out_dir))
        log.info("--resume_ckpt latest: %s", resume_ckpt)
    earlier = run_files(out_dir)
    if not earlier or resume_ckpt:
        return resume_ckpt, []
    if not overwrite:
        shown = [p for p in earlier if p.name != CONFIG_FILE]  # its checkpoints and logs
        names = ", ".join(p.name for p in shown[:3]) + (", ..." if len(shown) > 3 else "")
        raise UserError(f"--out_dir {out_dir_flag} already holds a training run ({names}); pass --resume_ckpt "
                        "(a file, or latest) to continue it, --overwrite to replace it, or choose another --out_dir")
    return resume_ckpt, earlier
