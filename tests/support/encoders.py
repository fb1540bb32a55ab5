"""What the serving-encoder tests share: the dev questions, and the CPU an encoder burns between questions."""

from __future__ import annotations

import json
import time

from .paths import SHARED

DEV = SHARED / "eval" / "dev.jsonl"


def dev_questions() -> list[str]:
    """The questions of ../shared/eval/dev.jsonl."""
    return [json.loads(line)["question"] for line in DEV.read_text(encoding="utf-8").splitlines() if line.strip()]


def idle_cpu_after_questions(encoder, questions: list[str], rounds: int = 5, pause: float = 0.05) -> float:
    """Encode every question (warm-up), then return the CPU seconds this process spends in ``pause`` after each
    of ``rounds`` more questions: threads left spinning after a run burn most of it."""
    for q in questions:
        encoder.encode([q])
    idle = 0.0
    for q in questions[:rounds]:
        encoder.encode([q])
        before = time.process_time()
        time.sleep(pause)
        idle += time.process_time() - before
    return idle
