# ----------------------------------------------------------------------------- bench.py
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
import bench  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pair():
    """Our tiny model and transformers + PEFT's, built as bench.py builds them."""
    cfg = bench.SHAPES["tiny"]["config"]
    ours = bench.build_ours(cfg, torch.device("cpu"), torch.float32)
    return cfg, ours, bench.build_theirs(ours, torch.device("cpu"), torch.float32)


def test_bench_tiny_quick_writes_both_sides(tmp_path):
    """The command from the README runs and its JSON holds both sides, ratios, hardware, versions, settings."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--shape", "tiny", "--repeats", "1", "--warmup", "0", "--quick", "--threads", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert {"hardware", "versions", "settings", "formulas", "parity", "table", "raw"} <= set(rep)
    assert rep["versions"]["torch"] == torch.__version__ and rep["versions"]["peft"] and rep["versions"]["transformers"]
    assert rep["parity"]["weights_equal"] and rep["parity"]["logits_rel_max_diff"] < 1e-4
    assert "6*N_llm" in rep["formulas"]["mfu"] and rep["settings"]["sampling"] == bench.SAMPLING
    rows = {(row["section"].split()[0], row["metric"]): row for row in rep["table"]}
    assert {s for s, _ in rows} == {"sft", "dpo", "vision+projector", "sample"}
    # direct timings are always there; decode steps/s is a difference of two noisy timings and may be n/a
    for key in [("sft", "tokens/s"), ("sft", "step ms"), ("dpo", "step ms"), ("vision+projector", "images/s"),
                ("sample", "new tokens/s")]:
        row = rows[key]
        assert row["ours"] > 0 and row["theirs"] > 0 and row["ratio"] == pytest.approx(row["ours"] / row["theirs"])
    sampled = {k for k in rep["raw"] if k.startswith("sample_")}
    assert sampled == {"sample_b16_unmerged", "sample_b16_merged"}
    assert all(len(side["times"]) == 1 for side in rep["raw"]["sft"].values())  # --repeats 1: one timed call per side


def test_parity_check_catches_a_different_weight(tiny_pair):
    cfg, ours, pm = tiny_pair
    batch = bench.make_batch(cfg, 2, 16, "cpu", torch.float32, seed=0)
    assert bench.check_parity(ours, pm, batch, bench.contextlib.nullcontext, 1e-4)["weights_equal"]
    # frozen weights are shared, not copied; what trains (projector, adapters) is each side's own
    q = "language_model.layers.0.self_attn.q_proj"
    theirs_q = pm.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert theirs_q.base_layer.weight.data_ptr() == ours.get_submodule(q).weight.data_ptr()
    assert theirs_q.lora_B["default"].weight.data_ptr() != ours.get_submodule(q).lora_b.data_ptr()
    b = theirs_q.lora_B["default"].weight
    with torch.no_grad():
        b[0, 0] += 1e-3
    try:
        with pytest.raises(RuntimeError, match="weights differ"):
            bench.check_parity(ours, pm, batch, bench.contextlib.nullcontext, 1e-4)
    finally:
        with torch.no_grad():
            b[0, 0] -= 1e-3


def test_dpo_loss_is_log2_at_the_reference_and_prefers_chosen():
    x = torch.tensor([-3.0, -7.0])
    assert bench.dpo_loss(x, x, x, x).item() == pytest.approx(math.log(2))
    pc = torch.tensor([-3.0], requires_grad=True)
    bench.dpo_loss(pc, torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0])).backward()
    assert pc.grad.item() < 0  # descending the loss raises the chosen answer's log-probability
    try:  # the same loss as the project's DPO job, where that imports
        import dpo
    except Exception:
        return
    args = [torch.randn(5, generator=torch.Generator().manual_seed(i)) * 3 for i in range(4)]
    assert bench.dpo_loss(*args, beta=0.3).item() == pytest.approx(dpo.dpo_loss(*args, beta=0.3)[0].mean().item())


def test_sequences_and_flops_count_image_tokens(tiny_pair):
    cfg, ours, _ = tiny_pair
    b = bench.make_batch(cfg, 3, 20, "cpu", torch.float32, seed=0)
    assert b["input_ids"].shape == (3, cfg.image_seq_length + 20)
    assert int((b["input_ids"] == cfg.image_token_id).sum()) == 3 * cfg.image_seq_length
    assert (b["labels"][:, :1 + cfg.image_seq_length] == -100).all() and (b["labels"][:, -1] != -100).all()
    pairs = bench.pair_batch(cfg, 2, 20, "cpu", torch.float32, seed=0)
    assert torch.equal(pairs["pixel_values"][:2], pairs["pixel_values"][2:])
    flops, formula = bench.train_flops(ours, 3, cfg.image_seq_length + 20)
    n_llm = sum(p.numel() for n, p in ours.named_parameters() if n.startswith(("language_model.layers.", "lm_head.")))
    assert flops > 6 * n_llm * 3 * (cfg.image_seq_length + 20) and f"N_llm={n_llm:,}" in formula


@pytest.mark.parametrize("shape", ["7b", "mistral7b"])
def test_gpu_shapes_map_onto_transformers_on_meta(shape):
    """The 7B configs that only a GPU runs: same tensor names and shapes on both sides (built on meta: no memory)."""
    from transformers import LlavaForConditionalGeneration
    cfg = bench.SHAPES[shape]["config"]
    with torch.device("meta"):
        ours = bench.M.Llava(cfg)
        hf = LlavaForConditionalGeneration(bench.hf_config(cfg))
    theirs = {k: v.shape for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert {bench.to_hf_name(k): v.shape for k, v in ours.state_dict().items()} == theirs
    n = sum(p.numel() for p in ours.parameters())
    assert 7.0e9 < n < 7.6e9 and cfg.image_seq_length == 576 and cfg.text.vocab_size == 32064
    flops, _ = bench.train_flops(ours, 8, 705)
    assert 6 * 6.5e9 * 8 * 705 < flops < 8 * 7.6e9 * 8 * 705  # ~6 N per token (+ attention)
