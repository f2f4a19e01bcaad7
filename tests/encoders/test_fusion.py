"""Encoder fusions: each paper equation checked on hand-built tensors, init invariants, shape errors,
and a contract test over every registered fusion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from encoders.base import EncoderError
from encoders.fusion.base import FeatureSpec
from encoders.fusion.comm import CommConfig, CommFusion
from encoders.fusion.concat import ConcatConfig, ConcatFusion
from encoders.fusion.convgate import ConvGateConfig, ConvGateFusion
from encoders.fusion.dbfusion import DBFusion, DBFusionConfig
from encoders.fusion.ftz import FtZConfig, FtZFusion
from mllm.registry import ENCODER_FUSIONS


def spec(*dims: int, grid: tuple[int, int] = (2, 2), prefix: int = 0) -> FeatureSpec:
    return FeatureSpec(tuple(dims), grid, grid[0] * grid[1] + prefix)


# --- concat / dbfusion ---------------------------------------------------------------------------
def test_concat_is_channel_concatenation_in_tower_then_tap_order() -> None:
    fusion = ConcatFusion(ConcatConfig(), [spec(2, 3), spec(4)])
    a, b, c = torch.randn(1, 4, 2), torch.randn(1, 4, 3), torch.randn(1, 4, 4)
    out = fusion([[a, b], [c]])
    assert (fusion.out_dim, fusion.out_grid, fusion.out_tokens) == (9, (2, 2), 4)
    assert torch.equal(out[..., :2], a) and torch.equal(out[..., 2:5], b) and torch.equal(out[..., 5:], c)


def test_concat_needs_one_grid() -> None:
    with pytest.raises(EncoderError, match=r"fusion concat: needs one token grid, found towers\[0\] \(2, 2\)"):
        ConcatFusion(ConcatConfig(), [spec(2), spec(2, grid=(4, 4))])
    with pytest.raises(EncoderError, match="set the fused encoder's grid"):
        ConcatFusion(ConcatConfig(), [spec(2), spec(2, prefix=1)])


def test_dbfusion_concatenates_depth_and_breadth_sets() -> None:
    """F = [V_d ; V_cap ; V_ocr ; V_grd]: four sets of one Florence-2 tower."""
    fusion = DBFusion(DBFusionConfig(), [spec(3, 3, 3, 3)])
    sets = [torch.full((2, 4, 3), float(k)) for k in range(4)]
    out = fusion([sets])
    assert out.shape == (2, 4, 12) and fusion.out_dim == 12
    assert out[0, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    with pytest.raises(EncoderError, match="dbfusion: needs at least two feature sets"):
        DBFusion(DBFusionConfig(), [spec(3)])


# --- COMM -----------------------------------------------------------------------------------------
def test_comm_equation_by_hand() -> None:
    """v̄ = [Σ α_i Lin_i(LN_i(v₁^i)) ; MLP(Σ β_j Lin_j(LN_j(v₂^j)))]."""
    fusion = CommFusion(CommConfig(mlp_layers=2, mlp_ratio=4.0), [spec(4, 4), spec(6, 6, 6)])
    assert fusion.clip.scales.tolist() == [0.5, 0.5] and torch.allclose(fusion.dino.scales, torch.full((3,), 1 / 3))
    assert [m.weight.shape for m in fusion.mlp if isinstance(m, torch.nn.Linear)] == [(16, 6), (4, 16)]
    with torch.no_grad():
        for p in fusion.parameters():
            p.uniform_(-1, 1)  # non-trivial LN affine, scales and biases
    clip = [torch.randn(2, 4, 4) for _ in range(2)]
    dino = [torch.randn(2, 4, 6) for _ in range(3)]

    def merge(module: torch.nn.Module, layers: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(2, 4, layers[0].shape[-1])
        for i, x in enumerate(layers):
            norm, lin = module.norms[i], module.linears[i]
            normed = F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)
            total = total + module.scales[i] * (normed @ lin.weight.T + lin.bias)
        return total

    first, last = fusion.mlp[0], fusion.mlp[2]
    v2 = merge(fusion.dino, dino)
    mlp = F.gelu(v2 @ first.weight.T + first.bias) @ last.weight.T + last.bias
    expected = torch.cat([merge(fusion.clip, clip), mlp], dim=-1)
    with torch.no_grad():
        out = fusion([clip, dino])
    assert out.shape == (2, 4, 8) and fusion.out_dim == 8
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_comm_shape_errors() -> None:
    with pytest.raises(EncoderError, match="fusion comm: expects 2 towers, got 1"):
        CommFusion(CommConfig(), [spec(4)])
    with pytest.raises(EncoderError, match="tapped layers must share one width"):
        CommFusion(CommConfig(), [spec(4, 8), spec(4)])
    with pytest.raises(EncoderError, match="mlp_layers: expected >= 1"):
        CommConfig(mlp_layers=0)
    assert len(CommFusion(CommConfig(mlp_layers=1), [spec(4), spec(6)]).mlp) == 1  # a plain Linear


# --- FtZ ------------------------------------------------------------------------------------------
def test_ftz_starts_as_the_anchor_and_keeps_its_tokens() -> None:
    fusion = FtZFusion(FtZConfig(heads=2, ffn=True), [spec(4, grid=(2, 2), prefix=1), spec(6, grid=(3, 3))])
    anchor, aug = torch.randn(2, 5, 4), torch.randn(2, 9, 6)
    assert torch.equal(fusion([[anchor], [aug]]), anchor)  # tanh(0) = 0 on both residual branches
    assert (fusion.out_dim, fusion.out_grid, fusion.out_tokens) == (4, (2, 2), 5)
    swapped = FtZFusion(FtZConfig(anchor=1, heads=3), [spec(4), spec(6, grid=(3, 3))])
    assert (swapped.out_dim, swapped.out_tokens) == (6, 9)


def test_ftz_cross_attention_by_hand() -> None:
    """A' = A + MHCA(LN(A), LN(G), LN(G)), softmax(Q Kᵀ / √d_h) V per head, ungated."""
    heads, d_a, d_g = 2, 4, 6
    fusion = FtZFusion(FtZConfig(heads=heads, gate=False), [spec(d_a), spec(d_g, grid=(1, 3))])
    with torch.no_grad():
        for p in fusion.parameters():
            p.uniform_(-1, 1)
    anchor, aug = torch.randn(2, 4, d_a), torch.randn(2, 3, d_g)
    attn = fusion.attn
    a = F.layer_norm(anchor, (d_a,), fusion.norm_a.weight, fusion.norm_a.bias)
    g = F.layer_norm(aug, (d_g,), fusion.norm_g.weight, fusion.norm_g.bias)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q = a @ attn.q_proj_weight.T + bq
    k = g @ attn.k_proj_weight.T + bk
    v = g @ attn.v_proj_weight.T + bv
    split = lambda t: t.reshape(2, t.shape[1], heads, d_a // heads).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d_a // heads), dim=-1)
    mixed = (weights @ split(v)).transpose(1, 2).reshape(2, 4, d_a)
    expected = anchor + mixed @ attn.out_proj.weight.T + attn.out_proj.bias
    with torch.no_grad():
        torch.testing.assert_close(fusion([[anchor], [aug]]), expected, atol=1e-5, rtol=0)


def test_ftz_shape_errors() -> None:
    with pytest.raises(EncoderError, match="heads 3 must divide the anchor width 4"):
        FtZFusion(FtZConfig(heads=3), [spec(4), spec(6)])
    with pytest.raises(EncoderError, match=r"towers\[0\] taps 2 layers; set its layers to 1 layer"):
        FtZFusion(FtZConfig(heads=2), [spec(4, 4), spec(6)])


# --- Conv-Gate ------------------------------------------------------------------------------------
def _convgate(**kw: object) -> ConvGateFusion:
    return ConvGateFusion(ConvGateConfig(**kw), [spec(4, grid=(3, 3)), spec(6, grid=(3, 3))])


def test_convgate_zero_init_gives_exactly_the_base_encoder() -> None:
    """P_h = P_l = 0 at start, so F = L whatever H and the gate are."""
    fusion = _convgate()
    low, high = torch.randn(2, 9, 4), torch.randn(2, 9, 6)
    out = fusion([[low], [high]])
    assert torch.equal(out, low)
    out.square().sum().backward()  # ... yet the zero projections do learn
    assert fusion.high_proj.weight.grad is not None and fusion.high_proj.weight.grad.abs().sum() > 0
    assert fusion.low_proj.weight.grad is not None and fusion.low_proj.weight.grad.abs().sum() > 0
    assert torch.equal(fusion.high_conv.bias, torch.zeros(6)) and torch.equal(fusion.low_conv.bias, torch.zeros(4))


def test_convgate_equations_by_hand() -> None:
    fusion = _convgate(zero_init=False)
    with torch.no_grad():
        for p in fusion.parameters():
            p.uniform_(-0.5, 0.5)
    low, high = torch.randn(2, 9, 4), torch.randn(2, 9, 6)
    L = low.transpose(1, 2).reshape(2, 4, 3, 3)
    H = high.transpose(1, 2).reshape(2, 6, 3, 3)
    f = fusion
    H2 = F.conv2d(F.gelu(F.conv2d(H, f.high_conv.weight, f.high_conv.bias)), f.high_proj.weight, f.high_proj.bias)
    dw = F.conv2d(L, f.low_conv.weight, f.low_conv.bias, padding=3, groups=4)
    L2 = L + F.conv2d(F.gelu(dw), f.low_proj.weight, f.low_proj.bias)
    L2, H2 = L2.flatten(2).transpose(1, 2), H2.flatten(2).transpose(1, 2)
    pooled = torch.cat([L2, H2], dim=-1).mean(dim=1)  # [B, 2·d_l]
    g = F.gelu(pooled @ f.gate[0].weight.T + f.gate[0].bias) @ f.gate[2].weight.T + f.gate[2].bias  # [B, 1]
    expected = L2 + torch.tanh(g)[:, :, None] * H2
    with torch.no_grad():
        torch.testing.assert_close(fusion([[low], [high]]), expected, atol=1e-6, rtol=0)
    assert f.gate[0].in_features == 8 and f.gate[0].out_features == 2  # 2·d_l -> d_l / 2 -> 1
    assert f.low_conv.kernel_size == (7, 7) and f.low_conv.groups == 4


def test_convgate_gate_is_one_scalar_per_image() -> None:
    fusion = _convgate(zero_init=False)
    low, high = torch.randn(2, 9, 4), torch.randn(2, 9, 6)
    other = high.clone()
    other[1] = torch.randn(9, 6)
    with torch.no_grad():
        a, b = fusion([[low], [high]]), fusion([[low], [other]])
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_convgate_shape_errors() -> None:
    with pytest.raises(EncoderError, match=r"towers\[0\] keeps prefix tokens; set its drop_prefix: true"):
        ConvGateFusion(ConvGateConfig(), [spec(4, prefix=1), spec(6, prefix=1)])
    with pytest.raises(EncoderError, match="needs one token grid"):
        ConvGateFusion(ConvGateConfig(), [spec(4), spec(6, grid=(4, 4))])
    with pytest.raises(ValueError, match="kernel: expected an odd positive size"):
        ConvGateConfig(kernel=4)


# --- every registered fusion ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ENCODER_FUSIONS.names())
def test_registered_fusion_contract(name: str) -> None:
    fusion = ENCODER_FUSIONS.build(name, {}, inputs=[spec(8), spec(16)])
    out = fusion([[torch.randn(3, 4, 8)], [torch.randn(3, 4, 16)]])
    assert out.shape == (3, fusion.out_tokens, fusion.out_dim) and fusion.out_grid == (2, 2)
    assert torch.isfinite(out).all()
