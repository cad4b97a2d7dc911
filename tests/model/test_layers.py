"""Each formula of the reference model against tests/model/reference_math.py (independent code)."""

import pytest
import torch
from dsc.model.rope import yarn_inv_freq

from tests.model import reference_math as R
from tests.tolerances import TOL


def _layer_inputs(model, S):
    cfg = model.config
    x = torch.randn(1, S, cfg.hidden_size)
    positions = torch.arange(S)[None]
    cos, sin = model._rope_at(positions)
    visible = model._visible(positions, S)
    caches = [
        torch.zeros(1, S, *e)
        for e in [
            (cfg.num_attention_heads, cfg.qk_head_dim),
            (cfg.num_attention_heads, cfg.v_head_dim),
            (cfg.index_head_dim,),
        ]
    ]
    theta = R.angles(cfg, yarn_inv_freq(cfg), S)
    return x, positions, cos, sin, visible, caches, theta


@pytest.mark.parametrize("S", [12, 40])  # dense (S <= index_topk = 16) and sparse
def test_mla_with_indexer_matches_independent_math(tiny, S):
    cfg = tiny.config
    attn = tiny.model.layers[1].self_attn
    x, positions, cos, sin, visible, caches, theta = _layer_inputs(tiny, S)
    with torch.no_grad():
        got = attn(x, cos, sin, positions, visible, *caches)[0]
        _, qr = R.mla(attn, cfg, x[0], theta, torch.ones(S, S, dtype=torch.bool))
        scores = R.indexer_scores(attn.indexer, cfg, x[0], qr, theta)
        sel = R.topk_mask(scores, cfg.index_topk)
        want, _ = R.mla(attn, cfg, x[0], theta, sel)
    if S > cfg.index_topk:
        assert (~sel).any(dim=1)[cfg.index_topk :].all(), "sparse selection must be active past index_topk"
    torch.testing.assert_close(got, want, **TOL["fp32_reassoc"])


def test_indexer_scores_and_selection(tiny):
    cfg = tiny.config
    attn = tiny.model.layers[0].self_attn
    S = 30
    x, positions, cos, sin, visible, caches, theta = _layer_inputs(tiny, S)
    with torch.no_grad():
        qr = attn.q_a_layernorm(attn.q_a_proj(x))
        got = attn.indexer.scores(x, qr, cos, sin, positions, caches[2])[0]
        want = R.indexer_scores(attn.indexer, cfg, x[0], qr[0], theta)
        torch.testing.assert_close(got, want, **TOL["fp32_reassoc"])
        mask = attn.indexer.select_mask(got[None], visible)[0]
    sel = mask == 0
    assert torch.equal(sel, R.topk_mask(got, cfg.index_topk))
    counts = sel.sum(-1)
    assert counts.tolist() == [min(t + 1, cfg.index_topk) for t in range(S)]  # min(k, visible), causal
    assert not sel.triu(1).any()


def test_indexer_ties_go_to_the_earlier_token(tiny):
    idx = tiny.model.layers[0].self_attn.indexer
    S = 24
    scores = torch.zeros(1, S, S)  # all tied (e.g. every ReLU term is 0)
    vis = torch.ones(S, S, dtype=torch.bool).tril()[None]
    sel = idx.select_mask(scores, vis)[0] == 0
    assert sel[-1].nonzero().flatten().tolist() == list(range(idx.topk))


def test_moe_routing_matches_per_token_loop(tiny):
    cfg = tiny.config
    gate = tiny.model.layers[1].mlp.gate
    x = torch.randn(64, cfg.hidden_size)
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.05)
        ids, wts = gate(x)
        want = R.route(gate, cfg, x)
        gate.e_score_correction_bias.zero_()
    for n, (wi, ww) in enumerate(want):
        order = ids[n].tolist()
        assert sorted(order) == sorted(wi)
        got = dict(zip(order, wts[n].tolist()))
        for e, w in zip(wi, ww):
            assert abs(got[e] - w) < 1e-5


def test_bias_selects_but_does_not_weight(tiny):
    cfg = tiny.config
    gate = tiny.model.layers[1].mlp.gate
    x = torch.randn(16, cfg.hidden_size)
    with torch.no_grad():
        bias = torch.zeros(cfg.n_routed_experts)
        bias[3] = 10.0  # expert 3 always selected...
        gate.e_score_correction_bias.copy_(bias)
        ids, wts = gate(x)
        gate.e_score_correction_bias.zero_()
        s = torch.sigmoid(x @ gate.weight.T)
    assert (ids == 3).any(-1).all()
    # ...but weighted by its unbiased score
    chosen = s.gather(-1, ids)
    torch.testing.assert_close(wts, chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


def test_group_limiting_drops_groups(tiny):
    cfg = tiny.config
    gate = tiny.model.layers[1].mlp.gate
    per = cfg.n_routed_experts // cfg.n_group
    x = torch.randn(200, cfg.hidden_size)
    with torch.no_grad():
        ids, _ = gate(x)
    groups = (ids // per).tolist()
    assert all(len(set(g)) <= cfg.topk_group for g in groups)


def test_moe_layer_output(tiny):
    cfg = tiny.config
    moe = tiny.model.layers[1].mlp
    x = torch.randn(10, cfg.hidden_size)
    with torch.no_grad():
        got = moe(x)
        want = torch.zeros_like(x)
        for n, (ids, ws) in enumerate(R.route(moe.gate, cfg, x)):
            for e, w in zip(ids, ws):
                ex = moe.experts[e]
                want[n] += (
                    w
                    * ex.down_proj.weight
                    @ (torch.nn.functional.silu(ex.gate_proj.weight @ x[n]) * (ex.up_proj.weight @ x[n]))
                )
            sh = moe.shared_experts
            want[n] += sh.down_proj.weight @ (
                torch.nn.functional.silu(sh.gate_proj.weight @ x[n]) * (sh.up_proj.weight @ x[n])
            )
    torch.testing.assert_close(got, want, **TOL["fp32_reassoc"])


def test_mtp_wiring(tiny):
    """MTP logits at i = head(norm(block(eh_proj([enorm(emb(t_i+1)); hnorm(h_i)]))))."""
    cfg = tiny.config
    tokens = torch.randint(0, 256, (1, 10))
    mtp = tiny.model.layers[cfg.num_hidden_layers]
    with torch.no_grad():
        logits, mtp_logits = tiny(tokens)
        caches = tiny.new_cache(1, 10)
        _, hidden = tiny.prefill(tokens, caches)
        e = R.rms(mtp.embed_tokens.weight[tokens[0, 1:]], mtp.enorm.weight, cfg.rms_norm_eps)
        h = R.rms(hidden[0, :-1], mtp.hnorm.weight, cfg.rms_norm_eps)
        hp = torch.cat((e, h), -1) @ mtp.eh_proj.weight.T
        S = 9
        x, positions, cos, sin, visible, c3, theta = _layer_inputs(tiny, S)
        hb = mtp(hp[None], cos, sin, positions, visible, c3)
        want = R.rms(hb[0], mtp.shared_head.norm.weight, cfg.rms_norm_eps) @ mtp.shared_head.head.weight.T
    assert mtp_logits.shape == (1, 9, cfg.vocab_size)
    torch.testing.assert_close(mtp_logits[0], want, **TOL["fp32_reassoc"])
    # the head is fed the *post-norm* hidden state of the main model (spec §8.1)
    torch.testing.assert_close(logits[0], hidden[0] @ tiny.lm_head.weight.T, **TOL["fp32_reassoc"])


@pytest.mark.parametrize("N", [20, 3, 1])  # many tokens (sorted dispatch); a verify and a decode step (token by token)
def test_moe_op_matches_reference_and_has_gradients(N):
    from dsc.kernels.moe import moe_experts_ref

    E, D, Fd, K = 6, 8, 12, 2
    x = torch.randn(N, D, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    wts = torch.rand(N, K, requires_grad=True)
    ws = [[torch.randn(Fd, D, requires_grad=True) for _ in range(E)] for _ in range(2)] + [
        [torch.randn(D, Fd, requires_grad=True) for _ in range(E)]
    ]
    y = torch.ops.dsc.moe_experts(x, idx, wts, *ws)
    y_ref = moe_experts_ref(x, idx, wts, *ws)
    torch.testing.assert_close(y, y_ref, **TOL["fp32_reassoc"])
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, wts, ws[0][1]], g)
    want = torch.autograd.grad(y_ref, [x, wts, ws[0][1]], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL["fp32_reassoc"])
