"""A short soak inside `make test` (issue #14): tools.soak's own loop, 35 prompts on the session's
server. Every finished prompt must carry correct statuses (the soak's checks), the server must still
answer, and ConditionalRegenerate's previews in temp/ must stay within its last PREVIEW_RUNS_KEPT
runs. RSS over so few prompts is noise: printed, with only a loose sanity bound.
"""
import os

from nudging_core.preview_retention import PREVIEW_RUNS_KEPT
from tools import soak

PROMPTS, INTERRUPT_EVERY, WARMUP = 35, 8, 8
# Seed 19 draws, from make_prompt's choices (no timing enters them): both workflows at batch 1 and 2,
# 4 interrupts (all in single-pass prompts, long enough to be caught running), and 11 memorized
# captions in memorization_guard.json (one at batch 2), so ConditionalRegenerate previews more runs
# than it keeps while the cheap clean and single-pass prompts make up the rest. A change to
# make_prompt's draws may need another seed.
SEED = 19
MAX_FILES_PER_RUN = 4            # batch 2: two flagged originals and their two replacements


def temp_files(host) -> set[str]:
    root = os.path.join(host.home, "temp")
    return {os.path.relpath(os.path.join(d, f), host.home) for d, _s, files in os.walk(root) for f in files}


def test_short_soak_statuses_server_and_bounded_previews(host, checkpoint):
    ctx = soak.soak_context(host, os.path.basename(checkpoint))
    before = temp_files(host)
    result = soak.run_soak(host, ctx, PROMPTS, seed=SEED, interrupt_every=INTERRUPT_EVERY, warmup=WARMUP,
                           report_every=12)
    print(f"short soak: {result['completed']} completed, {result['interrupted']} interrupted, "
          f"{result['preview_runs']} preview runs, {result['previews_on_disk']} previews on disk, "
          f"server RSS {result['rss_after_warmup_mb']} MB after {WARMUP} prompts -> {result['rss_final_mb']} MB "
          f"({100 * result['rss_growth']:+.2f} %), {result['seconds']} s, mix {result['mix']}")

    assert result["problems"] == []
    assert result["completed"] + result["interrupted"] == PROMPTS
    assert result["interrupted"] >= 2, "the interrupts must land in running prompts"
    assert {f"{w} batch {b}" for w in soak.WORKFLOWS for b in (1, 2)} <= set(result["mix"]), result["mix"]
    assert host.get("/system_stats")["system"]
    queue = host.get("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []

    runs = result["previews"]
    assert len(runs) > PREVIEW_RUNS_KEPT, f"only {len(runs)} runs previewed: the window was never exceeded"
    kept = {p for run in runs[-PREVIEW_RUNS_KEPT:] for p in run}
    gone = {p for run in runs[:-PREVIEW_RUNS_KEPT] for p in run}
    on_disk = temp_files(host)
    assert kept <= on_disk, "a preview of the last runs was deleted"
    assert not gone & on_disk, "older previews were left in temp/"
    assert on_disk - before <= kept, "temp/ holds files the soak's previews do not explain"
    assert len(kept) <= PREVIEW_RUNS_KEPT * MAX_FILES_PER_RUN

    assert result["rss_growth"] < 0.5, "server memory grew by half in a short soak"
