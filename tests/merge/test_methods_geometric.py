"""Hand-computed expectations for model_stock, nuslerp, multislerp, karcher, arcee_fusion and
ram (mergekit 0.1.5's formulas), their chunking, parameters and the compute dtype.

Tolerances: 1e-6 absolute on float32 results unless the case is exact (then torch.equal).
"""

from __future__ import annotations

import math

import pytest
import torch
from merge_testlib import assert_one_line_error, run_cli, tensors

from weightsmith.errors import CheckpointError
from weightsmith.merge.methods import TensorParams, merge_tensors
from weightsmith.merge.methods.arcee_fusion import arcee_fusion
from weightsmith.merge.methods.karcher import karcher
from weightsmith.merge.methods.model_stock import model_stock
from weightsmith.merge.methods.multislerp import multislerp
from weightsmith.merge.methods.nuslerp import nuslerp
from weightsmith.merge.methods.ram import ram

T = torch.tensor
R = 1 / math.sqrt(2)


def close(a: torch.Tensor, b) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- model_stock
def test_model_stock_ratio_from_the_angle_between_task_vectors():
    # δ1 = [1, 0], δ2 = [1, 1]: cos = 1/√2, t = 2c / (1 + c) = 2(√2 − 1)
    t = 2 * (math.sqrt(2) - 1)
    base = T([1.0, 1.0])
    out = model_stock(base, [T([2.0, 1.0]), T([2.0, 2.0])])
    close(out, [t * 2.0 + (1 - t) * 1.0, t * 1.5 + (1 - t) * 1.0])


def test_model_stock_orthogonal_or_opposite_task_vectors_keep_the_base():
    base = T([0.5, -0.5])
    # orthogonal: cos 0, t 0; opposite: 1 + (k − 1)·cos = 0 is the singular case, t = 0
    assert torch.equal(model_stock(base, [T([1.5, -0.5]), T([0.5, 0.5])]), base)
    assert torch.equal(model_stock(base, [T([1.5, -0.5]), T([-0.5, -0.5])]), base)


def test_model_stock_filter_wise_takes_one_ratio_per_row():
    base = torch.zeros(2, 2)
    x1, x2 = T([[1.0, 0.0], [1.0, 0.0]]), T([[0.0, 1.0], [1.0, 0.0]])
    # row 0: orthogonal (t = 0, the base); row 1: the same direction (t = 1, the mean)
    out = model_stock(base, [x1, x2], filter_wise=True)
    assert torch.equal(out, T([[0.0, 0.0], [1.0, 0.0]]))
    # per tensor: cos = 1/2 over the whole tensors -> t = 2·0.5 / 1.5
    close(model_stock(base, [x1, x2]), (2 / 3) * (x1 + x2) / 2)


# ---------------------------------------------------------------------- nuslerp
def test_nuslerp_interpolates_on_the_circle_with_t_from_the_weights():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    close(nuslerp(a, b), [R, R])
    # weights 1, 3 -> t = 0.75: [sin(π/8), sin(3π/8)]
    close(nuslerp(a, b, (1.0, 3.0)), [math.sin(math.pi / 8), math.sin(3 * math.pi / 8)])
    # weights summing to ~0 -> t = 0.5
    close(nuslerp(a, b, (1.0, -1.0)), [R, R])


def test_nuslerp_colinear_is_lerp_and_base_gives_task_vectors():
    close(nuslerp(T([1.0, 0.0]), T([2.0, 0.0])), [1.5, 0.0])
    base = T([1.0, 1.0])
    close(nuslerp(T([2.0, 1.0]), T([1.0, 2.0]), base=base), [1 + R, 1 + R])


def test_nuslerp_rows_and_columns():
    a, b = T([[1.0, 0.0], [0.0, 1.0]]), T([[0.0, 1.0], [0.0, 2.0]])
    # rows: row 0 orthogonal (midpoint on the circle), row 1 colinear (lerp)
    close(nuslerp(a, b, flatten=False), [[R, R], [0.0, 1.5]])
    # columns (row_wise): column 0 = [1, 0] vs [0, 0] (zero vector: cos 0), column 1 = [0, 1]
    # vs [1, 2]: cos = 2/√5
    theta = math.acos(2 / math.sqrt(5))
    c = math.sin(theta / 2) / math.sin(theta)
    expected = [[R, c * 1.0], [0.0, c * 3.0]]
    close(nuslerp(a, b, flatten=False, row_wise=True), expected)


# ---------------------------------------------------------------------- multislerp
def test_multislerp_is_the_spherical_midpoint_scaled_by_the_mean_norm():
    close(multislerp([T([1.0, 0.0]), T([0.0, 1.0])], [1.0, 1.0]), [R, R])
    # norms 2 and 4 -> the direction is the same, the length their weighted mean, 3
    close(multislerp([T([2.0, 0.0]), T([0.0, 4.0])], [1.0, 1.0]), [3 * R, 3 * R])
    # with a base the task vectors are interpolated
    base = T([1.0, -1.0])
    close(
        multislerp([T([3.0, -1.0]), T([1.0, 3.0])], [1.0, 1.0], base=base), [1 + 3 * R, -1 + 3 * R]
    )


def test_multislerp_degenerate_cases():
    x = T([1.0, 2.0])
    assert torch.equal(multislerp([x], [1.0]), x)  # one model: that model
    # antipodal pair with equal weights: the linear fallback, 0.5·x + 0.5·(−x)
    assert torch.equal(multislerp([x, -x], [1.0, 1.0]), torch.zeros(2))
    with pytest.raises(CheckpointError, match="weighted mean direction is zero"):
        multislerp([x, -x, torch.zeros(2)], [1.0, 1.0, 1.0])


# ---------------------------------------------------------------------- karcher
def test_karcher_mean_of_two_directions_and_the_mean_norm():
    close(karcher([T([1.0, 0.0]), T([0.0, 1.0])]), [R, R])
    close(karcher([T([2.0, 0.0]), T([0.0, 4.0])]), [3 * R, 3 * R])


def test_karcher_iterates_to_the_geodesic_mean():
    # three unit vectors at 0°, 0° and 90°: the Karcher mean on the circle is at 30°
    xs = [T([1.0, 0.0]), T([1.0, 0.0]), T([0.0, 1.0])]
    out = karcher(xs, max_iter=50, tol=1e-7)
    close(out, [math.cos(math.pi / 6), math.sin(math.pi / 6)])
    # one iteration stops short of it (the start is the normalized Euclidean mean, at 26.6°)
    one = karcher(xs, max_iter=0)
    close(one, [2 / math.sqrt(5), 1 / math.sqrt(5)])


# ---------------------------------------------------------------------- arcee_fusion
def test_arcee_fusion_keeps_only_outlier_importances():
    base = torch.zeros(5)
    x = T([1.0, 2.0, 3.0, 4.0, 100.0])
    # importance = |δ|·KL (one row): quantiles at indices 1, 2, 3 of the sorted values ->
    # threshold = 3 + 1.5·(4 − 2) = 6 (times KL): only the 100 survives
    assert torch.equal(arcee_fusion(base, x), T([0.0, 0.0, 0.0, 0.0, 100.0]))
    # identical inputs: KL 0, every importance 0 >= threshold 0 -> the model (= the base)
    assert torch.equal(arcee_fusion(x, x), x)


# ---------------------------------------------------------------------- ram
def test_ram_unique_changes_kept_shared_changes_averaged():
    base = torch.zeros(3)
    out = ram(base, [T([1.0, 0.0, 2.0]), T([3.0, 1e-6, 0.0])])
    # entry 0: both changed -> mean 2; entry 1: |1e-6| <= epsilon -> unchanged; entry 2: one
    assert torch.equal(out, T([2.0, 0.0, 2.0]))
    assert torch.equal(ram(base, [T([1.0, 0.0, 2.0]), T([3.0, 1e-6, 0.0])], epsilon=0.0),
                       T([2.0, 1e-6, 2.0]))  # fmt: skip


# ---------------------------------------------------------------------- chunking, dtype
CASES = {
    "model_stock": (4, {"filter_wise": True}, None),
    "nuslerp": (3, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [1.0, 2.0]),
    "multislerp": (3, {}, [0.2, 0.5, 0.3]),
    "karcher": (3, {}, None),
    "arcee_fusion": (2, {}, None),
    "ram": (3, {"epsilon": 0.01}, None),
}


def _params(name: str, n: int, extra: dict, weights, dtype=None) -> TensorParams:
    models = tuple({"weight": w} for w in weights) if weights else ()
    base = {"nuslerp": True, "multislerp": False}.get(name)
    return TensorParams("t", extra, models, has_base=base, compute_dtype=dtype)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_chunked_equals_whole(name, dtype):
    """``combine`` sees sub-ranges at any offset: 7-element chunks give the same bits."""
    n, extra, weights = CASES[name]
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(6, 5, generator=gen) for _ in range(n)]
    params = _params(name, n, extra, weights, dtype)
    whole = merge_tensors(name, xs, params)
    assert torch.equal(merge_tensors(name, xs, params, chunk_size=7), whole)
    if dtype is not None:  # the arithmetic really ran in bfloat16: not the float32 result
        wide = merge_tensors(name, xs, _params(name, n, extra, weights))
        assert not torch.equal(whole.float(), wide)
        assert whole.dtype in (torch.bfloat16, torch.float32)


@pytest.mark.parametrize(
    ("recipe", "fragment"),
    [
        ("merge_method: nuslerp\nmodels: [{model: A, parameters: {weight: 1}}, "
         "{model: B, parameters: {weight: 1}}, {model: C, parameters: {weight: 1}}]",
         "nuslerp merges exactly 2 models besides the base, got 3"),
        ("merge_method: model_stock\nbase_model: A\nmodels: [{model: B}]",
         "model_stock merges at least 2 models besides the base, got 1"),
        ("merge_method: multislerp\nmodels: [{model: A, parameters: {weight: 1}}]\n"
         "parameters: {eps: -1}", "parameters.eps: eps must be in [0, inf]"),
        ("merge_method: karcher\nmodels: [{model: A}, {model: B}]\n"
         "parameters: {max_iter: 2.5}", "parameters.max_iter: max_iter must be an integer"),
        ("merge_method: ram\nbase_model: A\nmodels: [{model: B}]\n"
         "parameters: {epsilon: .nan}", "parameters.epsilon"),
        ("merge_method: nuslerp\nmodels: [{model: A, parameters: {weight: 1}}, "
         "{model: B, parameters: {weight: 1}}]\nparameters: {nuslerp_flatten: maybe}",
         "nuslerp_flatten must be true or false"),
        ("merge_method: karcher\nmodels: [{model: A}, {model: B}]\ncompute_dtype: float8",
         "compute_dtype 'float8'"),
    ],
)  # fmt: skip
def test_bad_parameters_are_one_line_errors(tmp_path, trio, recipe, fragment):
    names = dict(zip("ABC", trio, strict=True))
    text = recipe
    for k, v in names.items():
        text = text.replace(f"model: {k}", f"model: {v}").replace(
            f"base_model: {k}", f"base_model: {v}"
        )
    path = tmp_path / "r.yml"
    path.write_text(text)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("run", path, "-o", out), fragment)
    assert not out.exists()


def test_cli_commands_match_the_tensor_functions(tmp_path, trio):
    base, a, b = trio
    out = tmp_path / "ms"
    assert run_cli("model-stock", "--base", base, a, b, "-o", out).exit_code == 0
    x0, x1, x2 = tensors(base), tensors(a), tensors(b)
    got = tensors(out)
    for n in x0:
        assert torch.equal(got[n], model_stock(x0[n], [x1[n], x2[n]]).to(got[n].dtype)), n
    out = tmp_path / "nu"
    r = run_cli("nuslerp", a, b, "--base", base, "--weights", "1,3", "--no-flatten", "-o", out)
    assert r.exit_code == 0, r.output
    got = tensors(out)
    for n in x0:
        want = nuslerp(x1[n], x2[n], (1.0, 3.0), base=x0[n], flatten=False)
        assert torch.equal(got[n], want), n
    assert_one_line_error(
        run_cli("ram", "--base", base, a, "--epsilon", "-1", "-o", out), "--epsilon"
    )
    assert_one_line_error(run_cli("karcher", a, "-o", tmp_path / "k"), "at least two")


def test_compute_dtype_float32_keeps_the_float32_arithmetic(tmp_path, tiny_model):
    """bfloat16 models: by default TIES runs in bfloat16 (mergekit); --compute-dtype float32
    gives what float32 arithmetic on the same values gives, rounded once."""
    base, a, b = (tiny_model("llama", s, torch.bfloat16) for s in (0, 1, 2))
    args = ("ties", "--base", base, a, b, "--density", "0.5", "--weights", "0.7,0.4")
    narrow, wide = tmp_path / "narrow", tmp_path / "wide"
    assert run_cli(*args, "-o", narrow).exit_code == 0
    assert run_cli(*args, "-o", wide, "--compute-dtype", "float32").exit_code == 0
    xs = [tensors(p) for p in (base, a, b)]
    n_wide, n_narrow = tensors(wide), tensors(narrow)
    differ = 0
    for n in xs[0]:
        from weightsmith.merge.methods import ties_merge

        ref = ties_merge(xs[0][n].float(), [xs[1][n].float(), xs[2][n].float()], [0.7, 0.4], 0.5)
        assert torch.equal(n_wide[n], ref.bfloat16()), n
        assert n_narrow[n].dtype == torch.bfloat16
        differ += int((n_narrow[n] != n_wide[n]).sum())
    assert differ > 0  # the bfloat16 arithmetic rounds differently somewhere
    # the same through a recipe: compute_dtype: float32 is the option's YAML key
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {base}\ncompute_dtype: float32\nmodels:\n"
        f"  - {{model: {a}, parameters: {{weight: 0.7, density: 0.5}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 0.4, density: 0.5}}}}\n"
    )
    assert run_cli("run", recipe, "-o", tmp_path / "yaml").exit_code == 0
    from_yaml = tensors(tmp_path / "yaml")
    assert all(torch.equal(from_yaml[n], n_wide[n]) for n in n_wide)
    assert "compute_dtype: float32" in (tmp_path / "yaml" / "mergekit_config.yml").read_text()
