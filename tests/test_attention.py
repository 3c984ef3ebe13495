"""titok_core.attention: the written-out route gives the fused kernel's result, and each case takes its route."""
import pytest
import torch
import torch.nn.functional as F

from generator.lightning_module import mask_tokens, masked_token_loss
from generator.model import ImageBert
from titok_bench.attention import main as bench_main
from titok_core import attention as attention_mod
from titok_core.attention import WRITTEN_OUT_MAX_SCORES, attention, written_out, written_out_is_faster


def _qkv(shape, dtype, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_written_out_gives_the_fused_result_and_gradients(dtype, tol):
    a, b = _qkv((3, 2, 17, 16), dtype), _qkv((3, 2, 17, 16), dtype)
    out_a, out_b = written_out(*a), F.scaled_dot_product_attention(*b)
    assert out_a.dtype == dtype and out_a.shape == (3, 2, 17, 16)
    torch.testing.assert_close(out_a.float(), out_b.float(), atol=tol, rtol=tol)
    grad_out = torch.randn(out_a.shape).to(dtype)
    out_a.backward(grad_out)
    out_b.backward(grad_out)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad.float(), y.grad.float(), atol=4 * tol, rtol=4 * tol)


def test_dropout_on_the_weights():
    q, k, v = _qkv((2, 2, 5, 4), torch.bfloat16)
    assert torch.equal(attention(q, k, v, dropout_p=1.0), torch.zeros_like(v))  # every weight dropped
    torch.manual_seed(0)
    kept = attention(q, k, v, dropout_p=0.5)
    assert kept.shape == v.shape and not torch.equal(kept, attention(q, k, v))


def test_each_case_takes_its_route(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_mod, "written_out", lambda *a, **kw: calls.append("written_out") or written_out(*a, **kw))
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append("fused") or fused(*a, **kw))
    small = (4, 2, 33, 8)
    attention(*_qkv(small, torch.bfloat16))  # training a small model on a CPU in bf16
    attention(*_qkv(small, torch.float16))
    attention(*_qkv(small, torch.float32))  # fp32: the fused kernel is faster
    attention(*_qkv(small, torch.bfloat16, grad=False))  # no gradient: sampling, caching, evaluation
    with torch.no_grad():
        attention(*_qkv(small, torch.bfloat16))
    side = int((WRITTEN_OUT_MAX_SCORES // 2) ** 0.5) + 1  # just over the limit with B * H = 2
    big = _qkv((1, 2, side, 1), torch.bfloat16)
    assert not written_out_is_faster(big[0])
    assert written_out_is_faster(_qkv((1, 1, side, 1), torch.bfloat16)[0])
    assert calls == ["written_out", "written_out", "fused", "fused", "fused"]


def test_a_bf16_training_step_matches_the_fused_route(monkeypatch):
    """The generator's loss and gradients under CPU bf16 autocast are the fused route's, to bf16 rounding."""
    torch.manual_seed(0)
    model = ImageBert(hidden_size=64, depth=2, num_heads=2, mlp_dim=128, codebook_size=50, num_tokens=16,
                      num_classes=5, dropout=0.0, attn_drop=0.0)
    tokens = torch.randint(0, 50, (32, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(2))
    inputs, mask = mask_tokens(tokens, model.mask_id, generator=torch.Generator().manual_seed(3))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs, labels)
        loss, _ = masked_token_loss(logits, tokens, mask)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    taken = []
    monkeypatch.setattr(attention_mod, "written_out", lambda *a, **kw: taken.append(1) or written_out(*a, **kw))
    loss_w, grads_w = loss_and_grads()
    assert len(taken) == 2  # one call a block
    monkeypatch.setattr(attention_mod, "written_out_is_faster", lambda q: False)
    loss_f, grads_f = loss_and_grads()
    assert len(taken) == 2
    assert abs(loss_w - loss_f) < 2e-3 * loss_f
    cos = F.cosine_similarity(grads_w, grads_f, dim=0)
    assert cos > 0.999, cos


def test_the_benchmark_prints_both_routes(capsys):
    result = bench_main(["--shape", "2,2,9,8", "--iters", "1", "--warmup", "0", "--dtype", "bf16"])
    (row,) = result["shapes"]
    assert row["shape"] == [2, 2, 9, 8] and row["train_route"] == "written_out" and row["forward_route"] == "fused"
    assert all(row[k] > 0 for k in ("train_fused_ms", "train_written_out_ms", "forward_fused_ms",
                                    "forward_written_out_ms"))
    assert '"benchmark": "attention"' in capsys.readouterr().out


@pytest.mark.parametrize("shape", ["64,4,33", "a,b,c,d", "2,0,9,8"])
def test_the_benchmark_refuses_a_bad_shape_in_one_line(shape, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_main(["--shape", shape])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument --shape: {shape!r} is not B,H,L,Dh" in err
