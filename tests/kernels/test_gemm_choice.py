"""``kernels.gemm_choice``: which W8A8 integer GEMM runs on CUDA (the Triton GEMM or ``torch._int_mm``
+ the epilogue kernel). Pure Python: the timings come from an injected timer, no GPU needed."""

import pytest
import torch

from viditq_compile.kernels import gemm_choice as gc


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(gc.ENV, raising=False)
    gc.clear()
    yield
    gc.clear()


def _runs(calls):
    """One callable per route that records each call and returns its route's name."""
    def make(route):
        def run():
            calls.append(route)
            return route
        return run
    return {r: make(r) for r in gc.ROUTES}


def _timer(seconds):
    """A timer that reads the route off the callable's result: ``seconds[route]``."""
    return lambda fn: seconds[fn()]


KEY = gc.BucketKey.of(4096, 4608, 1152, "w8a8-sym+bias->bfloat16", 90)


@pytest.mark.parametrize("m,bucket", [(0, 16), (1, 16), (16, 16), (17, 32), (4096, 4096), (4097, 8192),
                                      (65536, 65536), (10 ** 6, 65536)])
def test_m_buckets_are_powers_of_two_clamped_like_the_triton_autotune_key(m, bucket):
    assert gc.m_bucket(m) == bucket
    import triton  # the Triton GEMM's M_BUCKET: int_gemm.kernel_args

    assert bucket == triton.next_power_of_2(max(min(m, 65536), 16))


def test_bucket_keys_share_m_within_a_power_of_two_and_split_on_everything_else():
    a = gc.BucketKey.of(3000, 4608, 1152, "v", 90)
    assert a == gc.BucketKey.of(4096, 4608, 1152, "v", 90) == gc.BucketKey.of(2049, 4608, 1152, "v", 90)
    assert a.row() == (4096, 1152, 4608, "v", 90)
    others = [gc.BucketKey.of(2048, 4608, 1152, "v", 90), gc.BucketKey.of(3000, 4608, 3072, "v", 90),
              gc.BucketKey.of(3000, 1152, 1152, "v", 90), gc.BucketKey.of(3000, 4608, 1152, "w", 90),
              gc.BucketKey.of(3000, 4608, 1152, "v", 80)]
    assert len({a, *others}) == 6
    with pytest.raises(ValueError, match="N=0"):
        gc.BucketKey.of(16, 0, 16, "v", 90)
    with pytest.raises(ValueError, match="M=-1"):
        gc.m_bucket(-1)


def test_variant_names_cover_the_epilogue_specialization():
    names = {gc.variant_name(z, b, a, g, r, d) for z in (False, True) for b in (False, True)
             for a in ("none", "gelu_tanh", "silu") for g in (False, True) for r in (False, True)
             for d in (torch.bfloat16, torch.float32)}
    assert len(names) == 2 * 2 * 3 * 2 * 2 * 2
    assert gc.variant_name(True, True, "gelu_tanh", True, True, torch.bfloat16) == \
        "w8a8-asym+bias+gelu_tanh+gate+res->bfloat16"


@pytest.mark.parametrize("args,needle", [
    ((4096, 4608, 1152, 4, 0), "W4 weights"),
    ((4096, 4608, 1152, 8, 128), "weight groups of 128"),
    ((4096, 4608, 1152, 8, 0, True), "packed 4-bit activations"),
    ((4096, 4608, 1152, 8, 0, False, True), "e4m3"),
    ((16, 4608, 1152, 8, 0), "M=16: torch._int_mm needs M > 16"),
    ((4096, 4608, 1156, 8, 0), "K=1156: torch._int_mm needs K a positive multiple of 8"),
    ((4096, 4604, 1152, 8, 0), "N=4604: torch._int_mm needs N a positive multiple of 8"),
    ((4096, 0, 1152, 8, 0), "N=0"),
])
def test_int_mm_refusals_name_the_rule(args, needle):
    reason = gc.int_mm_unsupported_reason(*args)
    assert reason is not None and needle in reason


@pytest.mark.parametrize("m,n,k", [(17, 8, 8), (4096, 4608, 1152), (65536, 1152, 4608), (33, 24, 40)])
def test_int_mm_takes_int8_per_channel_with_m_over_16_and_k_n_multiples_of_8(m, n, k):
    assert gc.int_mm_unsupported_reason(m, n, k, 8, 0) is None


def test_the_rules_agree_with_torch_int_mm_on_the_cpu_where_it_is_laxer():
    """On CUDA ``_int_mm_out_cuda`` enforces the rules; the CPU kernel takes more (M <= 16 too), so
    the accepted shapes must run there and give the int64 reference exactly."""
    from viditq_compile.numerics.quant import int_gemm_ref

    g = torch.Generator().manual_seed(0)
    for m, n, k in [(17, 8, 8), (33, 24, 40)]:
        assert gc.int_mm_unsupported_reason(m, n, k, 8, 0) is None
        x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        assert torch.equal(torch._int_mm(x, w.t()), int_gemm_ref(x, w))
    with pytest.raises(ValueError, match="negative"):
        gc.int_mm_unsupported_reason(-1, 8, 8, 8, 0)


def test_first_call_of_a_bucket_times_both_routes_and_caches_the_faster():
    calls = []
    choice = gc.choose(KEY, _runs(calls), None, timer=_timer({"triton": 2e-3, "int_mm": 1e-3}))
    assert choice.route == "int_mm" and dict(choice.times) == {"triton": 2e-3, "int_mm": 1e-3}
    assert "timed" in choice.reason and "int_mm 1000.0 us" in choice.reason
    assert sorted(calls) == ["int_mm", "int_mm", "triton", "triton"]  # a warm-up + the timed call each
    calls.clear()
    again = gc.choose(gc.BucketKey.of(3000, 4608, 1152, KEY.variant, 90), _runs(calls), None,
                      timer=_timer({"triton": 1e-3, "int_mm": 9e-3}))
    assert again == choice and calls == []  # same bucket: cached, nothing run or timed
    assert gc.routes() == {KEY: choice}


def test_the_triton_gemm_wins_when_it_is_faster_and_other_buckets_are_timed_anew():
    calls = []
    gc.choose(KEY, _runs(calls), None, timer=_timer({"triton": 2e-3, "int_mm": 1e-3}))
    other = gc.BucketKey.of(256, 4608, 1152, KEY.variant, 90)
    choice = gc.choose(other, _runs(calls), None, timer=_timer({"triton": 1e-4, "int_mm": 3e-4}))
    assert choice.route == "triton"
    assert {k: c.route for k, c in gc.routes().items()} == {KEY: "int_mm", other: "triton"}


def test_a_refused_call_runs_triton_untimed_with_the_reason():
    calls = []
    reason = gc.int_mm_unsupported_reason(4096, 4608, 1152, 4, 0)
    choice = gc.choose(KEY, _runs(calls), reason, timer=_timer({"triton": 1.0, "int_mm": 0.0}))
    assert choice.route == "triton" and choice.reason == reason and calls == []
    assert gc.routes()[KEY].describe() == f"triton: {reason}"


@pytest.mark.parametrize("route", gc.ROUTES)
def test_the_environment_forces_a_route_without_timing_or_caching(monkeypatch, route):
    calls = []
    monkeypatch.setenv(gc.ENV, route.upper())
    choice = gc.choose(KEY, _runs(calls), None, timer=_timer({"triton": 1.0, "int_mm": 1.0}))
    assert choice.route == route and gc.ENV in choice.reason and calls == []
    monkeypatch.setenv(gc.ENV, "auto")
    slow = {"triton": 1e-3, "int_mm": 2e-3} if route == "int_mm" else {"triton": 2e-3, "int_mm": 1e-3}
    timed = gc.choose(KEY, _runs(calls), None, timer=_timer(slow))
    assert timed.route != route and "timed" in timed.reason  # the forced call cached nothing


def test_forced_context_overrides_the_environment_and_nests(monkeypatch):
    monkeypatch.setenv(gc.ENV, "triton")
    calls = []
    with gc.forced("int_mm"):
        assert gc.choose(KEY, _runs(calls), None).route == "int_mm"
        with gc.forced(None):  # timed, whatever the environment says
            timed = gc.choose(KEY, _runs(calls), None, timer=_timer({"triton": 2.0, "int_mm": 3.0}))
            assert timed.route == "triton" and "timed" in timed.reason
        assert gc.forced_route() == "int_mm"
    assert gc.forced_route() == "triton"


def test_forcing_int_mm_on_a_refused_call_runs_triton_and_says_why(monkeypatch):
    monkeypatch.setenv(gc.ENV, "int_mm")
    reason = gc.int_mm_unsupported_reason(8, 4608, 1152, 8, 0)
    choice = gc.choose(KEY, _runs([]), reason)
    assert choice.route == "triton" and choice.reason == f"{gc.ENV}=int_mm forced, but {reason}"


def test_bad_routes_are_refused_by_name(monkeypatch):
    monkeypatch.setenv(gc.ENV, "cublas")
    with pytest.raises(ValueError, match="VIDITQ_GEMM_ROUTE='cublas'"):
        gc.forced_route()
    with pytest.raises(ValueError, match="route='cublas'"):
        with gc.forced("cublas"):
            pass
    with pytest.raises(ValueError, match="route='cublas'"):
        gc.Choice("cublas", "")
    monkeypatch.delenv(gc.ENV)
    with pytest.raises(ValueError, match=r"run has routes \['triton'\]"):
        gc.choose(KEY, {"triton": lambda: None}, None)


def test_without_cuda_or_a_timer_nothing_is_timed_or_cached():
    calls = []
    choice = gc.choose(KEY, _runs(calls), None, cuda=False)
    assert choice.route == "triton" and "not a CUDA device" in choice.reason and calls == []
    timed = gc.choose(KEY, _runs(calls), None, timer=_timer({"triton": 2.0, "int_mm": 1.0}), cuda=False)
    assert timed.route == "int_mm"  # an injected timer times anywhere


def test_cuda_event_timer_refuses_no_repetitions():
    with pytest.raises(ValueError, match="reps=0"):
        gc.cuda_event_timer(lambda: None, reps=0)


def test_an_int_mm_route_that_fails_when_timed_leaves_the_bucket_on_triton_and_says_why():
    def fail():
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")

    calls = []
    run = dict(_runs(calls), int_mm=fail)
    choice = gc.choose(KEY, run, None, timer=_timer({"triton": 1.0}))
    assert choice.route == "triton" and "CUBLAS_STATUS_NOT_SUPPORTED" in choice.reason
    assert gc.choose(KEY, run, None, timer=_timer({"triton": 1.0})) == choice  # cached
    with pytest.raises(RuntimeError, match="CUBLAS"):  # the Triton GEMM's own failure is not hidden
        gc.choose(gc.BucketKey.of(64, 8, 8, "v", 90), dict(run, triton=fail), None, timer=_timer({}))
