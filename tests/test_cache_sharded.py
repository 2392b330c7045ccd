"""Sharded build across 2 CPU processes (accelerate.debug_launcher) equals a single-process build."""

from __future__ import annotations

import json
import os

import torch

from softalign.teachers import TeacherCache
from tests.launch import debug_launch
from tests.test_cache_support import CAPTION_TO_IMAGE, CAPTIONS, FakeImageTeacher, FakeTextTeacher, save_images


def _worker(out, paths, report_dir):
    from accelerate import PartialState

    state = PartialState()
    t, i = FakeTextTeacher(), FakeImageTeacher()
    cache = TeacherCache.build(
        out,
        CAPTIONS,
        paths,
        CAPTION_TO_IMAGE,
        text_teacher=t,
        image_teacher=i,
        chunk_size=3,
        accelerator=state,
        progress=False,
    )
    sims = cache.similarities(torch.arange(12))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local = torch.arange(6) + 6 * rank  # each process holds half of the batch; gather=True rebuilds the whole
    gathered = cache.similarities(local, gather=True)
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(
            {
                "world": world,
                "text_calls": t.calls,
                "images": i.encoded,
                "sim_text": sims.text.tolist(),
                "gathered_text": gathered.text.tolist(),
                "gathered_image": gathered.image.tolist(),
            },
            fh,
        )


def test_two_process_build_shares_chunks_and_merges(tmp_path):
    paths = save_images(tmp_path)
    report = tmp_path / "report"
    report.mkdir()
    debug_launch(_worker, str(tmp_path / "sharded"), paths, str(report), num_processes=2)
    r0 = json.loads((report / "rank0.json").read_text())
    r1 = json.loads((report / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    # 4 text chunks of 3 + 2 image chunks of 3/1 = 6 tasks, dealt round-robin: each caption encoded once
    encoded = sorted(c for calls in (r0["text_calls"], r1["text_calls"]) for chunk in calls for c in chunk)
    assert encoded == sorted(CAPTIONS)
    assert r0["text_calls"] and r1["text_calls"]
    assert r0["images"] + r1["images"] == 4

    single = TeacherCache.build(
        tmp_path / "single",
        CAPTIONS,
        paths,
        CAPTION_TO_IMAGE,
        text_teacher=FakeTextTeacher(),
        image_teacher=FakeImageTeacher(),
        chunk_size=3,
        progress=False,
    )
    sharded = TeacherCache.load(tmp_path / "sharded")
    assert sharded.manifest["num_processes"] == 2
    ids = torch.arange(12)
    for a, b in zip(sharded.embeddings(ids), single.embeddings(ids)):
        assert torch.equal(a, b)
    full = single.similarities(ids)
    torch.testing.assert_close(torch.tensor(r1["sim_text"]), full.text)
    for r in (r0, r1):
        torch.testing.assert_close(torch.tensor(r["gathered_text"]), full.text)
        torch.testing.assert_close(torch.tensor(r["gathered_image"]), full.image)
    assert not (tmp_path / "sharded" / ".partial").exists()
