"""The demo training script (seeded, resumable) and the evaluation, on the tiny preset."""

import json
import keyword
import re

import pytest
import torch
import torch.nn.functional as F
from dsc.model import DeepseekV32ForCausalLM, preset

from dsc.data import eval_windows, load_corpus, stdlib_files
from dsc.evaluate import evaluate, greedy_text, loop_repeats
from dsc.runtime import EagerBackend, SamplingParams, generate
from dsc.train import main as train_main


def test_corpus_split_is_fixed_and_disjoint():
    files = stdlib_files()
    assert len(files) > 100
    held = load_corpus("heldout", 256, 257)
    train = load_corpus("train", 256, 257, max_bytes=200_000)
    assert held.max() <= 257 and train.max() <= 257 and len(held) > 10_000
    assert torch.equal(held, load_corpus("heldout", 256, 257))  # deterministic


def test_train_is_seeded_and_resumable(tmp_path, capsys):
    args = [
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--seq-len",
        "40",
        "--warmup",
        "1",
        "--log-every",
        "1",
        "--steps",
        "3",
        "--dense-fraction",
        "0.4",
    ]
    train_main(["--out", str(tmp_path / "a"), *args])
    train_main(["--out", str(tmp_path / "b"), "--stop-after", "2", *args])
    train_main(["--out", str(tmp_path / "b"), *args])  # resumes at step 2
    out = capsys.readouterr().out
    assert "resumed at step 2" in out and "step 3/3" in out and "bpb" in out
    a = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-5)
    hist = json.loads((tmp_path / "a" / "history.json").read_text())
    assert [h["sparse"] for h in hist] == [False, True, True]  # dense warm-up, then DSA
    # the aux-loss-free balancing moved the gate biases, gradients did not
    assert any(v.abs().sum() > 0 for k, v in a["model"].items() if k.endswith("e_score_correction_bias"))


TINY_RUN = ["--preset", "tiny", "--batch", "2", "--seq-len", "40", "--warmup", "1", "--steps", "2", "--log-every", "1"]


def _two_runs(tmp_path, flag: str, value: str) -> tuple[dict, dict]:
    """The train states of the same seeded tiny run without and with ``flag value``."""
    train_main(["--out", str(tmp_path / "default"), *TINY_RUN])
    train_main(["--out", str(tmp_path / "with"), flag, value, *TINY_RUN])
    return tuple(torch.load(tmp_path / d / "train_state.pt", weights_only=True) for d in ("default", "with"))


def _refused(tmp_path, capsys, flag: str, bad: tuple[str, ...], why: str) -> None:
    """Each bad value of ``flag`` stops the run by name before it writes anything."""
    capsys.readouterr()
    for value in bad:
        with pytest.raises(SystemExit):
            train_main(["--out", str(tmp_path / "bad"), flag, value, *TINY_RUN])
        assert f"{flag}: {why}, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_train_mtp_weight(tmp_path, capsys):
    """--mtp-weight weighs the MTP loss (the same seeded run with another weight moves the MTP module's
    weights differently); a negative or non-finite weight is refused by name before any work."""
    a, b = _two_runs(tmp_path, "--mtp-weight", "2.5")
    eh = [k for k in a["model"] if "eh_proj" in k]
    assert eh and any(not torch.equal(a["model"][k], b["model"][k]) for k in eh)
    _refused(tmp_path, capsys, "--mtp-weight", ("-1", "nan", "inf", "x"), "a finite number >= 0")


def test_train_mtp_distill(tmp_path, capsys):
    """--mtp-distill moves a share of the MTP loss to the KL from the main model's next-position
    distribution: the loss is that KL (checked by hand), it reaches the MTP module's weights, and a
    share outside [0, 1] is refused by name before any work."""
    from dsc.train import losses

    model = DeepseekV32ForCausalLM(preset("tiny")).init_weights(0)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    parts = losses(model, tokens, sparse=True, distill=True)
    logits, mtp = model(tokens)
    p, q = logits[:, 1:-1].softmax(-1), mtp[:, :-1].softmax(-1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(parts["mtp_kd"], want, rtol=1e-4, atol=1e-6)
    assert "mtp_kd" not in losses(model, tokens, sparse=True)
    parts["mtp_kd"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "eh_proj" in n)  # the MTP side learns

    a, b = _two_runs(tmp_path, "--mtp-distill", "1")
    assert "mtp_kd" in b["history"][-1] and "mtp_kd" not in a["history"][-1]
    eh = [k for k in a["model"] if "eh_proj" in k]
    assert eh and any(not torch.equal(a["model"][k], b["model"][k]) for k in eh)
    _refused(tmp_path, capsys, "--mtp-distill", ("-0.1", "1.5", "nan", "x"), "a share between 0 and 1")


def test_train_leak_weight(tmp_path, capsys):
    """--leak-weight adds, in the sparse stage, -log of the share of each head's dense attention on the
    indexer's top-k: checked against that share computed by hand, 0 where the selection keeps every
    key, reaching the attention's weights and not the indexer's; a bad weight is refused by name."""
    from dsc.train import attention_leak, losses

    g = torch.Generator().manual_seed(0)
    B, S, H, T, k = 2, 6, 3, 6, 2
    scores = torch.randn(B, S, H, T, generator=g)
    visible = torch.ones(S, T, dtype=torch.bool).tril().expand(B, S, T)
    chosen = torch.rand(B, S, T, generator=g).argsort(-1) < k
    mask = torch.zeros(B, S, T).masked_fill(~(chosen & visible), float("-inf"))
    mask[:, :, 0] = 0.0  # every query keeps at least one visible key
    dense = scores.masked_fill(~visible.unsqueeze(2), float("-inf")).softmax(-1)
    share = (dense * (mask == 0).unsqueeze(2)).sum(-1)  # (B, S, H)
    rec = {"scores": scores, "visible": visible, "index_mask": mask}
    torch.testing.assert_close(attention_leak([rec, rec]), -share.log().mean())
    keep_all = rec | {"index_mask": torch.zeros(B, S, T).masked_fill(~visible, float("-inf"))}
    assert attention_leak([keep_all]).item() == 0

    model = DeepseekV32ForCausalLM(preset("tiny")).init_weights(0)
    tokens = torch.randint(0, 256, (2, 40), generator=g)  # longer than the tiny top-k (16): keys are dropped
    parts = losses(model, tokens, sparse=True, leak=True)
    assert parts["leak"].item() > 0 and "leak" not in losses(model, tokens, sparse=False, leak=True)
    parts["leak"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "q_b_proj" in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if "indexer" in n)

    a, b = _two_runs(tmp_path, "--leak-weight", "5")
    assert "leak" in b["history"][-1] and "leak" not in a["history"][-1]
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if "q_b_proj" in k)
    _refused(tmp_path, capsys, "--leak-weight", ("-1", "nan", "x"), "a finite number >= 0")


def test_evaluate_reports_every_figure():
    model = DeepseekV32ForCausalLM(preset("tiny")).init_weights(0).eval()
    windows = eval_windows(load_corpus("heldout", 256, 257), 40, 3)
    res = evaluate(model, windows, batch=2)
    assert 6 < res["bits_per_byte_sparse"] < 10 and 6 < res["bits_per_byte_dense"] < 10  # untrained: ~log2(320)
    assert 0 < res["indexer_topk_recall"] <= 1
    assert len(res["expert_load_per_moe_layer"]) == 2  # layer 1 and the MTP layer
    assert 0 <= res["mtp_first_draft_acceptance"] <= 1
    text = greedy_text(model, new_tokens=40)
    assert set(text) == {"def ", "import ", "class "}
    for prompt, t in text.items():  # the model's own greedy continuation, scored independently here
        ids = generate(
            EagerBackend(model), [[model.config.bos_token_id, *prompt.encode()]], SamplingParams(40, stop_at_eos=False)
        ).tokens[0]
        assert len(ids) == 40  # never cut at EOS
        want = bytes(i for i in ids if i < 256)
        assert t["text"] == want.decode("utf-8", errors="replace")
        assert t["loop_repeats"] == loop_repeats(want)
        words = set(re.findall(r"[A-Za-z_]+", prompt + t["text"]))
        assert t["keywords"] == sorted(w for w in words if keyword.iskeyword(w)) and prompt.strip() in t["keywords"]


def test_loop_repeats_counts_a_greedy_loop_at_its_own_period():
    assert loop_repeats(b"def it in the set the set the set the set the set") == 5  # "the set " x 5
    assert loop_repeats(b"def __init__(self, self, self, self, self, self):") == 3  # period 6: each window every 12
    assert loop_repeats(b"import os\nimport sys\nclass A:\n    def f(self):\n        return 1\n") == 1
    assert loop_repeats(b"x" * 80) == 10 and loop_repeats(b"short") == 0


def test_a_programs_bits_per_byte_are_its_models(tiny, tiny_optimized):
    """The optimized Program's prefill scores the held-out bytes as the model does
    in its served (sparse) form: dsc.evaluate --program."""
    from dsc.evaluate import program_bits_per_byte

    windows = eval_windows(load_corpus("heldout", 256, 257), 40, 3)
    want = evaluate(tiny, windows, batch=2)["bits_per_byte_sparse"]
    program, _ = tiny_optimized
    assert abs(program_bits_per_byte(program, windows, batch=2) - want) < 2e-3


def test_train_init_starts_from_a_checkpoints_weights(tmp_path):
    import pytest

    from dsc.errors import DscError
    from dsc.frontends.reference import load_model

    train_main(["--out", str(tmp_path / "r"), "--preset", "tiny", "--init", "tiny", "--seed", "7", "--steps", "0"])
    got = torch.load(tmp_path / "r" / "train_state.pt", weights_only=True)["model"]
    want = load_model("tiny")[0].state_dict()  # the preset's seeded weights, not --seed 7's
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(DscError, match="hidden_size"):
        train_main(["--out", str(tmp_path / "x"), "--preset", "tiny", "--init", "demo", "--steps", "0"])


def test_ship_writes_and_replaces_a_demo_directory(tmp_path):
    """--ship: train_state.pt -> bf16 HF directory; shipping again replaces it (never a directory of
    other files); a state from before runs recorded their config ships at the depth of its weights."""
    import dataclasses

    import pytest

    from dsc.errors import DscError
    from dsc.evaluate import ship
    from dsc.frontends.reference import load_model

    run = tmp_path / "run"
    run.mkdir()
    model = DeepseekV32ForCausalLM(dataclasses.replace(preset("demo"), num_hidden_layers=2)).init_weights(3)
    torch.save({"model": model.state_dict()}, run / "train_state.pt")  # no "config": an early run's state
    dest = tmp_path / "demo"
    for _ in range(2):
        ship(run, dest)
        shipped, _ = load_model(str(dest))
        assert shipped.config.num_hidden_layers == 2  # the depth of its weights, not the preset's
        w = "model.layers.0.self_attn.q_a_proj.weight"
        assert torch.equal(shipped.state_dict()[w], model.state_dict()[w].bfloat16().float())
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DscError, match="did not write"):
        ship(run, other)
    assert (other / "notes.txt").read_text() == "mine"


def test_grow_starts_from_the_shallower_checkpoints_exact_function(tmp_path, capsys):
    """--init CKPT --grow (block expansion): the deeper model repeats CKPT's MoE layers in place, each
    repeat's output projections zeroed, so its main and MTP logits are CKPT's bit for bit; the repeats
    still learn (their output projections get gradients); any other difference is refused."""
    import dataclasses

    from dsc.errors import DscError
    from dsc.evaluate import ship
    from dsc.frontends.reference import load_model
    from dsc.train import grown_layer_sources, init_from

    assert grown_layer_sources(1, 4, 10) == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert grown_layer_sources(1, 2, 4) == [0, 1, 1, 1]
    src, _ = load_model("tiny")
    deep = DeepseekV32ForCausalLM(dataclasses.replace(preset("tiny"), num_hidden_layers=4)).init_weights(9)
    init_from(deep, "tiny", grow=True)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))  # past index_topk: sparse
    with torch.no_grad():
        (want, want_mtp), (got, got_mtp) = src.eval()(tokens), deep.eval()(tokens)
    assert torch.equal(got, want) and torch.equal(got_mtp, want_mtp)
    mtp = len(deep.model.layers) - 1
    assert torch.equal(deep.model.layers[mtp].eh_proj.weight, src.model.layers[2].eh_proj.weight)
    assert not deep.model.layers[2].self_attn.o_proj.weight.any()
    deep.train()
    F.cross_entropy(deep(tokens)[0][:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert deep.model.layers[2].self_attn.o_proj.weight.grad.abs().sum() > 0
    assert deep.model.layers[3].mlp.shared_experts.down_proj.weight.grad.abs().sum() > 0

    with pytest.raises(DscError, match="num_hidden_layers"):  # without --grow: refused by name
        init_from(deep, "tiny")
    with pytest.raises(DscError, match="fewer num_hidden_layers"):  # --grow is not a shrink, nor a reshape
        init_from(DeepseekV32ForCausalLM(dataclasses.replace(preset("tiny"), num_hidden_layers=1)), "tiny", grow=True)
    with pytest.raises(DscError, match="hidden_size"):
        init_from(DeepseekV32ForCausalLM(preset("demo")), "tiny", grow=True)

    # the CLI: --layers deepens the preset, --init --grow fills it, --ship writes the run's own config
    train_main(
        ["--out", str(tmp_path / "g"), "--preset", "tiny", "--layers", "3", "--init", "tiny", "--grow", "--steps", "0"]
    )
    state = torch.load(tmp_path / "g" / "train_state.pt", weights_only=True)["model"]
    w = "self_attn.q_a_proj.weight"
    assert torch.equal(state[f"model.layers.2.{w}"], src.state_dict()[f"model.layers.1.{w}"])
    shipped, _ = load_model(str(ship(tmp_path / "g", tmp_path / "shipped")))
    assert shipped.config.num_hidden_layers == 3 and shipped.config.hidden_size == preset("tiny").hidden_size
    _refused(tmp_path, capsys, "--layers", ("0", "-2", "x"), "a whole number >= 1")
    with pytest.raises(SystemExit):
        train_main(["--out", str(tmp_path / "bad"), "--grow", *TINY_RUN])
    assert "--grow: grows the --init checkpoint" in capsys.readouterr().err and not (tmp_path / "bad").exists()
