"""tools/convert_to_hf.py: a TP=2 x DP=2 ZeRO-3 run (the layout zero_to_fp32 refuses) becomes a
Hugging Face folder that transformers loads with nbp_mega made unimportable: its logits are
nbp_mega's over the real vocabulary (padded rows dropped), its NBP generation gives
tools/sample.py's greedy tokens, and the plain state-dict file it also writes samples the same
in tools/sample.py. Every layout (positions, families, block shapes, hybrid text start, the
K600 layout with given frames, NTP) matches on random-weight models. Bad input is refused with
nothing left behind. (TP=1 checkpoints against DeepSpeed's zero_to_fp32: test_load.py.)
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nbp_mega.config import Config
from nbp_mega.export import ExportError, export_hf
from nbp_mega.export.weights import Weights, export_name
from nbp_mega.generate import SamplingConfig, generate
from nbp_mega.generate.load import load_trained_model
from nbp_mega.model import NBPTransformer
from nbp_mega.parallel.layers import TensorParallel
from tests.conftest import tiny_model_config
from tests.test_bench_tools import load_tool
from tests.test_train import ROOT

pytestmark = pytest.mark.distributed

# Run by a fresh interpreter outside the repository, nbp_mega blocked: what a user of the
# export has. For each job: the folder's logits for the given inputs, and its greedy clips.
HF_CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["nbp_mega"] = None  # any import of nbp_mega raises ImportError
    import torch
    from transformers import AutoModel

    for job in json.load(open(sys.argv[1])):
        model = AutoModel.from_pretrained(job["dir"], trust_remote_code=True).eval()
        inputs = torch.load(job["inputs"])
        with torch.no_grad():
            out = model(input_ids=inputs["ids"])
        greedy = model.generate_video(**inputs["generate"])
        torch.save({"logits": out.logits, "greedy": greedy,
                    "module": type(model).__module__}, job["outputs"])
""")


def run_hf_child(tmp_path, jobs: list[dict]) -> list[dict]:
    """jobs: {dir, ids [B, S], generate: kwargs of generate_video} -> their outputs."""
    spec = []
    for i, job in enumerate(jobs):
        torch.save({"ids": job["ids"], "generate": job["generate"]}, tmp_path / f"in{i}.pt")
        spec.append({"dir": str(job["dir"]), "inputs": str(tmp_path / f"in{i}.pt"),
                     "outputs": str(tmp_path / f"out{i}.pt")})
    (tmp_path / "jobs.json").write_text(json.dumps(spec))
    (tmp_path / "child.py").write_text(HF_CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "jobs.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(s["outputs"]) for s in spec]


def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"{ROOT}/tools/convert_to_hf.py", *map(str, args),
                           "--no-progress"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def exported(tp2_run, tmp_path_factory):
    from tests.generate.test_sample_cli import write_tokenizer

    out = tmp_path_factory.mktemp("export")
    tokenizer = write_tokenizer(out / "tok32.pt", (4, 4, 2))  # 32 codes: the run's vocabulary
    proc = convert(tp2_run, out / "hf", "--max-shard-size", "40KB", "--state-dict",
                   out / "model.pt", "--tokenizer", tokenizer)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(proc.stdout)


def test_tp2_zero3_export_is_nbp_megas_model_in_transformers(exported, tp2_run, dims,
                                                             tmp_path):
    out, summary = exported
    model, cfg = load_trained_model(str(tp2_run), dims=dims)  # TP=1, the trained weights
    assert summary["layout"] == {"tp": 2, "dp": 2, "zero_stage": 3, "bf16": False, "pp": 1}
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["video_tokenizer"] == "video_tokenizer/tok32.pt"
    assert filecmp.cmp(out / "hf" / config["video_tokenizer"], out / "tok32.pt", shallow=False)
    # sharded safetensors with their index; the padded vocabulary rows are gone
    index = json.loads((out / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / "hf" / f).exists() for f in files)
    tensors = {k: v for f in files for k, v in load_file(out / "hf" / f).items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    state = model.state_dict()
    assert set(tensors) == {export_name(k) for k, v in state.items() if torch.is_tensor(v)}
    assert tensors["head.weight"].shape == (32, 32)  # 48 rows trained, 32 video ids
    assert tensors["tok_emb.weight"].shape == (model.layout.embed_vocab, 32)  # 37 of 48
    for name, value in state.items():
        if torch.is_tensor(value):
            rows = tensors[export_name(name)].shape[0]
            assert torch.equal(tensors[export_name(name)], value[:rows]), name

    tokens = torch.randint(0, 32, (3, 2, 4, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    ids, _ = model.layout.build(tokens, labels)
    (hf,) = run_hf_child(tmp_path, [{"dir": out / "hf", "ids": ids,
                                     "generate": {"labels": labels}}])
    assert hf["module"].startswith("transformers_modules")  # the folder's code, not ours
    with torch.no_grad():
        ours = model.logits(model.hidden_states(ids))
    assert hf["logits"].shape == (3, ids.shape[1], 32)
    torch.testing.assert_close(hf["logits"], ours[..., :32], rtol=0, atol=1e-5)
    assert torch.isinf(ours[..., 32:]).all()  # what was dropped carried no probability

    # tools/sample.py --greedy: from the run, and from the state-dict file; the export's
    # generate_video gives the same clips
    tool = load_tool("sample")
    clips = {}
    for name, source in (("run", tp2_run), ("file", out / "model.pt")):
        args = [str(source), "--out", str(tmp_path / name), "--num", "3", "--greedy",
                "--labels", "0", "1", "2"]
        assert tool.main(args) == 0
        clips[name] = np.load(tmp_path / name / "tokens.npy")
    assert np.array_equal(clips["run"], clips["file"])
    assert np.array_equal(hf["greedy"].numpy(), clips["run"])
    meta = json.loads((tmp_path / "file" / "samples.json").read_text())
    assert meta["checkpoint"]["path"] == str(out / "model.pt")


def test_state_dict_file_is_the_trained_model_at_any_tp(exported, tp2_run, dims):
    out, summary = exported
    model, _ = load_trained_model(str(tp2_run), dims=dims)
    from_file, cfg = load_trained_model(str(out / "model.pt"), dims=dims)
    assert cfg.model == model.cfg and summary["state_dict"]["tensors"] == len(
        [v for v in model.state_dict().values() if torch.is_tensor(v)])
    for (name, a), (_, b) in zip(model.state_dict().items(), from_file.state_dict().items(),
                                 strict=True):
        assert (a is None and b is None) or torch.equal(a, b), name


LAYOUTS = {
    "llama_rope_2x2x2_cfg": dict(family="llama", position="rope_3d", block_shape=[2, 2, 2],
                                 num_classes=3, cond_dropout=0.5),
    "gpt_3d_text_hybrid": dict(position="learned_3d", text_len=4, text_vocab=20,
                               hybrid_start=True),
    "k600_no_start_frames": dict(start_block=False, block_shape=[1, 4, 8]),
    "ntp_class": dict(block_shape=[1, 1, 1], num_classes=2, grid=[2, 2, 4]),
}


def random_model(dims, **changes):
    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=50, **changes)
    return NBPTransformer(cfg, TensorParallel(dims, init_std=0.2)).eval()


def conditioning(model, batch: int, gen) -> dict:
    cfg, out = model.cfg, {}
    if cfg.num_classes:
        out["labels"] = torch.arange(batch) % cfg.num_classes
    if cfg.text_len:
        out["text"] = torch.randint(0, cfg.text_vocab, (batch, cfg.text_len), generator=gen)
    if not cfg.start_block:  # the K600 layout: the first latent frame given
        _, H, W = cfg.grid
        out["context"] = torch.randint(0, cfg.vocab_size, (batch, 1, H, W), generator=gen)
    return out


def test_every_layout_exports_with_nbp_megas_logits_and_greedy_tokens(dims, tmp_path):
    jobs, refs = [], []
    for name, changes in LAYOUTS.items():
        model = random_model(dims, **changes)
        cfg = dataclasses.replace(Config(), model=model.cfg)
        export_hf(cfg, Weights.of_model(model), tmp_path / name)
        gen = torch.Generator().manual_seed(2)
        cond = conditioning(model, 2, gen)
        tokens = torch.randint(0, 50, (2, *model.cfg.grid), generator=gen)
        ids, _ = model.layout.build(tokens, cond.get("labels"), text=cond.get("text"))
        with torch.no_grad():
            logits = model.logits(model.hidden_states(ids))[..., :50]
        greedy = generate(model, seeds=[0, 1], sampling=SamplingConfig(temperature=0.0),
                          **cond)
        jobs.append({"dir": tmp_path / name, "ids": ids, "generate": cond})
        refs.append((name, logits, greedy))
    for (name, logits, greedy), hf in zip(refs, run_hf_child(tmp_path, jobs), strict=True):
        torch.testing.assert_close(hf["logits"], logits, rtol=0, atol=1e-5, msg=name)
        assert torch.equal(hf["greedy"], greedy), name


def test_bad_input_is_refused_and_nothing_is_left(tp2_run, tmp_path, dims):
    import shutil

    # an output folder that exists: refused, untouched
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    proc = convert(tp2_run, tmp_path / "taken")
    assert proc.returncode == 2 and "taken exists: expected a new path" in proc.stderr
    assert os.listdir(tmp_path / "taken") == ["mine.txt"]
    # a checkpoint missing a rank file: named, nothing written
    broken = tmp_path / "broken"
    shutil.copytree(tp2_run, broken)
    step = broken / "checkpoints" / "step_00000002"
    os.remove(step / "zero_pp_rank_1_mp_rank_01_model_states.pt")
    proc = convert(step, tmp_path / "out")
    assert proc.returncode == 2 and "zero_pp_rank_1_mp_rank_01_model_states.pt" in proc.stderr
    assert "is incomplete" in proc.stderr and not (tmp_path / "out").exists()
    # nothing to write
    proc = convert(tp2_run)
    assert proc.returncode == 2 and "nothing to write" in proc.stderr
    # an export interrupted half-way leaves no folder, complete-looking or partial
    model = random_model(dims, num_classes=3)
    cfg = dataclasses.replace(Config(), model=model.cfg)
    seen = []

    def interrupt(name):
        seen.append(name)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_hf(cfg, Weights.of_model(model), tmp_path / "cut", max_shard_bytes=10_000,
                  progress=interrupt)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("cut")]
    # a video tokenizer whose codebook is not the model's vocabulary
    from tests.generate.test_sample_cli import write_tokenizer

    tok = write_tokenizer(tmp_path / "tok32.pt", (4, 4, 2))  # 32 codes, the model has 50
    with pytest.raises(ExportError, match="codebook of 32 codes.*model.vocab_size=50"):
        export_hf(cfg, Weights.of_model(model), tmp_path / "tok", tokenizer=tok)
    assert not (tmp_path / "tok").exists()
    # sample.py given a file that is not a state dict
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert load_tool("sample").main([str(tmp_path / "junk.pt"), "--out",
                                     str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists()
