"""`attnc explain` / `attnc.explain`: the pass diffs, and tile maps checked against the masks evaluated pair by pair
with plain torch (independent of the mask analysis), on shapes that are not multiples of the tiles."""
import matplotlib.image
import pytest
import torch

import attnc
from attnc import cli
from attnc.explainer import CLASS_COLOURS, FULL, PARTIAL, RUN_TIME, SKIPPED, explain_spec
from attnc.passes import PIPELINE

HEAD = "q: bf16[B, H, M, D]  k: bf16[B, HKV, N, D]  v: bf16[B, HKV, N, D]"


def spec_of(masks: str, params: str = "", inputs: str = "") -> attnc.Attention:
    return attnc.parse(f"attention t {{\n {HEAD}\n {params}\n {inputs}\n {masks}\n return softmax(score) @ v\n}}")[0]


def expected_classes(keep: torch.Tensor, bm: int, bn: int) -> list[list[int]]:
    """From the whole [M, N] keep matrix: a tile with no kept pair is skipped, one with every pair kept full."""
    m, n = keep.shape
    out = []
    for r in range(0, m, bm):
        row = []
        for c in range(0, n, bn):
            block = keep[r:r + bm, c:c + bn]
            row.append(SKIPPED if not block.any() else FULL if block.all() else PARTIAL)
        out.append(row)
    return out


def grid(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(m).view(-1, 1), torch.arange(n).view(1, -1)


@pytest.mark.parametrize("m, n", [(1000, 1000), (700, 1300), (2048, 2048), (5, 1000)])  # 5: a decode tile
@pytest.mark.parametrize("window", [None, 300])
def test_causal_and_window_tiles_match_the_masks_pair_by_pair(m, n, window):
    masks = "mask causal" + ("\n mask i + (N - M) - j < window" if window else "")
    spec = spec_of(masks, "param window: i32 = 1" if window else "")
    x = explain_spec(spec, {"B": 2, "H": 4, "M": m, "N": n, "D": 64}, {"window": window} if window else {})
    i, j = grid(m, n)
    keep = j <= i + (n - m)
    if window:
        keep &= i + (n - m) - j < window
    t = x.tiles
    assert [list(r) for r in t.classes] == expected_classes(keep, t.block_m, t.block_n)
    # FLOPs: 2 (D + DV) per pair of every computed tile, clipped to M and N, times B * H
    pairs = sum(min(t.block_m, m - r * t.block_m) * min(t.block_n, n - c * t.block_n)
                for r, row in enumerate(t.classes) for c, cls in enumerate(row) if cls != SKIPPED)
    computed = sum(len(row) - row.count(SKIPPED) for row in t.classes)
    assert f"{computed} of {len(t.classes) * len(t.classes[0])} tiles computed" in x.summary()
    assert f"{2 * pairs * 128 * 2 * 4 / 1e9:.3g} GFLOP of a dense {2 * m * n * 128 * 2 * 4 / 1e9:.3g}" in x.summary()


def test_element_wise_masks_run_every_tile_in_their_hull():
    """Dilation and prefix-LM: every tile the loop runs evaluates the mask; no tile holding a kept pair is
    skipped, and the loop bounds skip the tiles outside the windows."""
    m = n = 1024
    i, j = grid(m, n)
    cases = [
        ("mask causal\n mask i - j < window\n mask (i - j) % dilation == 0",
         "param window: i32 = 256\n param dilation: i32 = 3", (j <= i) & (i - j < 256) & ((i - j) % 3 == 0)),
        ("mask j <= i or j < prefix", "param prefix: i32 = 300", (j <= i) | (j < 300)),
    ]
    for masks, params, keep in cases:
        x = explain_spec(spec_of(masks, params), {"B": 1, "H": 2, "M": m, "N": n, "D": 64})
        t = x.tiles
        want = expected_classes(keep, t.block_m, t.block_n)
        for row, want_row in zip(t.classes, want):
            for cls, w in zip(row, want_row):
                assert cls in (SKIPPED, PARTIAL) and (cls == SKIPPED) == (w == SKIPPED)
        assert "evaluated on every tile" in x.summary()


def test_data_dependent_masks_from_tensors_and_without():
    spec = spec_of("mask causal\n mask doc[b, i + (N - M)] == doc[b, j]", inputs="input doc: i32[B, N]")
    m = n = 1500
    doc = torch.bucketize(torch.arange(n), torch.tensor([200, 900, 1000]), right=True).int().view(1, n)
    q, k = torch.empty(1, 4, m, 64, dtype=torch.bfloat16), torch.empty(1, 2, n, 64, dtype=torch.bfloat16)
    x = attnc.explain(spec, q, k, k, doc=doc)
    i, j = grid(m, n)
    keep = (j <= i) & (doc[0][:, None] == doc[0][None, :])
    assert [list(r) for r in x.tiles.classes] == expected_classes(keep, x.tiles.block_m, x.tiles.block_n)
    assert x.sizes["HKV"] == 2 and "classed from the tensors given" in x.summary()
    blind = explain_spec(spec, {"B": 1, "H": 4, "M": m, "N": n, "D": 64})  # no tensor: decided at run time
    causal = expected_classes(j <= i, x.tiles.block_m, x.tiles.block_n)
    assert [[RUN_TIME if c != SKIPPED else SKIPPED for c in r] for r in causal] == [list(r) for r in
                                                                                     blind.tiles.classes]


def test_pass_steps_print_each_pass_as_a_diff():
    x = explain_spec(spec_of("mask causal"), {"B": 1, "H": 2, "M": 256, "N": 256, "D": 64})
    assert [s.name for s in x.steps] == ["spec", *(p.__name__ for p in PIPELINE)]
    text = x.passes_text()
    assert text.startswith("== spec\nattention t {")
    fold = text.split("== after fold_constants\n")[1].split("== after")[0]
    assert "-    score = qk * rsqrt(D)\n+    score = qk * 0.125" in fold
    masks = text.split("== after analyze_masks\n")[1].split("== after")[0]
    assert "+  exact      j >= max(0; -), j < min(N; i + (N - M) + 1)" in masks
    assert x.steps[-1].text.endswith(x.plan.describe())  # the last step is the plan attnc.compile builds


def test_front_ends_and_the_picture(tmp_path):
    @attnc.attention
    def windowed(q, k, v, *, window: int = 64):
        return attnc.softmax(q @ k, where=attnc.causal(q, k) & (q.pos - k.pos < window)) @ v

    q = torch.empty(1, 2, 600, 32, dtype=torch.bfloat16)  # bf16 as spec_of: the same tiles
    from_decorator = attnc.explain(windowed, q, q, q, window=100, png=tmp_path / "w.png")
    from_text = explain_spec(spec_of("mask causal\n mask i + (N - M) - j < window", "param window: i32 = 5"),
                             {"B": 1, "H": 2, "M": 600, "N": 600, "D": 32}, {"window": 100})
    assert from_decorator.tiles.classes == from_text.tiles.classes
    bm = attnc.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 600, 600)
    from_flex = attnc.explain(attnc.flex_attention, q, q, q, block_mask=bm)
    i, j = grid(600, 600)
    t = from_flex.tiles
    assert [list(r) for r in t.classes] == expected_classes(j <= i, t.block_m, t.block_n)
    pixels = matplotlib.image.imread(tmp_path / "w.png")[..., :3]
    colours = {tuple(round(float(c) * 255) for c in p) for p in pixels.reshape(-1, 3)[::7]}
    for cls in (SKIPPED, FULL, PARTIAL):
        hex_colour = CLASS_COLOURS[cls].lstrip("#")
        assert tuple(int(hex_colour[n:n + 2], 16) for n in (0, 2, 4)) in colours
    with pytest.raises(attnc.CallError, match=r"^shape: pass q, k, v or shape=\(B, H, M, N, D\)"):
        attnc.explain(from_text.spec)
    with pytest.raises(attnc.CallError, match=r"^what: expected an attnc.Attention"):
        attnc.explain("causal", shape=(1, 1, 8, 8, 8))


def test_cli_explain(tmp_path, capsys):
    spec_file = tmp_path / "p.attn"
    spec_file.write_text(f"attention p {{\n {HEAD}\n param prefix: i32\n mask j <= i or j < prefix\n"
                         f" return softmax(score) @ v\n}}\n")
    png = tmp_path / "p.png"
    assert cli.main(["explain", str(spec_file), "--shape", "1,2,512,512,64", "--param", "prefix=100",
                     "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "== after analyze_masks" in out and "p: B=1 H=2 M=512 N=512 D=64" in out and png.stat().st_size > 1000
    assert cli.main(["explain", str(spec_file), "--shape", "1,2,512,512,64"]) == 2
    assert "prefix: param i32 has no default; pass a value (CLI: --param prefix=<value>)" in capsys.readouterr().err
    assert cli.main(["explain", str(spec_file), "--param", "prefx=3"]) == 2
    assert "has no param 'prefx'; did you mean 'prefix'?" in capsys.readouterr().err
    assert cli.main(["explain", str(spec_file), "--shape", "1,2,512"]) == 2
    assert "expected five positive integers B,H,M,N,D" in capsys.readouterr().err
