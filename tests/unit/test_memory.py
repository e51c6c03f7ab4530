"""Memory budgets: sizes and budgets parsed (or refused with the value named), tiers planned fastest-first within a
budget, refusals naming the smallest budget that works, and the peak-memory meter."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from deltakit.memory import (
    EVAL_ALLOWANCE,
    TIER_NAMES,
    Budget,
    MemoryBudgetError,
    PeakMemory,
    format_size,
    parse_budget,
    parse_size,
    plan_memory,
)

CPU = torch.device("cpu")


# -- parse_size ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [
    ("5GB", 5 * 10**9), ("5gb", 5 * 10**9), ("5GiB", 5 * 2**30), ("5G", 5 * 2**30), ("5g", 5 * 2**30),
    ("5000MB", 5 * 10**9), ("5000MiB", 5000 * 2**20), ("1.5KB", 1500), (".5MB", 500_000), ("2TB", 2 * 10**12),
    ("1TiB", 2**40), ("512B", 512), ("5 GB", 5 * 10**9), ("  5GB  ", 5 * 10**9), ("3K", 3 * 2**10),
])
def test_parse_size_reads_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


def test_parse_size_takes_an_int_as_bytes():
    assert parse_size(123_456) == 123_456


@pytest.mark.parametrize("text", ["5", "5.5", " 42 "])
def test_a_bare_number_is_refused_as_having_no_unit(text):
    with pytest.raises(MemoryBudgetError, match="has no unit") as info:
        parse_size(text)
    assert repr(text) in str(info.value) and "5GB" in str(info.value)  # the value and an example of the fix


@pytest.mark.parametrize("text, unit", [("5XB", "'XB'"), ("5 gigs", "'gigs'"), ("5 bytes", "'bytes'")])
def test_an_unknown_unit_is_named(text, unit):
    with pytest.raises(MemoryBudgetError, match="unknown unit") as info:
        parse_size(text)
    assert unit in str(info.value) and repr(text) in str(info.value)


@pytest.mark.parametrize("value", ["0GB", "0", "0.0001B", "-1GB", "GB", "", "five GB", "1e3GB", "5GB5"])
def test_zero_negative_and_malformed_strings_are_refused(value):
    with pytest.raises(MemoryBudgetError) as info:
        parse_size(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [0, -1, -5 * 10**9, float("nan"), float("inf"), float("-inf"), True, False, None,
                                   [5], b"5GB"])
def test_non_positive_non_finite_and_non_numeric_values_are_refused(value):
    with pytest.raises(MemoryBudgetError) as info:
        parse_size(value)
    assert repr(value) in str(info.value)


def test_a_fraction_of_a_byte_is_refused_not_rounded_to_zero():
    with pytest.raises(MemoryBudgetError):
        parse_size(0.5)


def test_the_budget_error_is_a_value_error():
    assert issubclass(MemoryBudgetError, ValueError)


def test_the_error_names_what_was_parsed():
    with pytest.raises(MemoryBudgetError, match=r"^memory budget cpu= '5'"):
        parse_size("5", what="memory budget cpu=")


# -- format_size --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.00 KB"), (1500, "1.50 KB"),
                                     (10**6, "1.00 MB"), (5.37e9, "5.37 GB"), (2.5e12, "2.50 TB"),
                                     (2**30, "1.07 GB")])
def test_format_size_uses_powers_of_ten(n, text):
    assert format_size(n) == text


def test_format_size_output_parses_back_to_about_the_same_size():
    for n in (1234, 5_678_901, 3.3e9):
        assert parse_size(format_size(n).replace(" ", "")) == pytest.approx(n, rel=0.01)


# -- parse_budget -------------------------------------------------------------------------------------------------
def test_a_size_on_cpu_is_the_host_budget():
    budget = parse_budget("5GB", CPU)
    assert (budget.host, budget.device) == (5 * 10**9, None)
    assert "5GB" in budget.source and "given" in budget.source
    assert parse_budget(10**9, CPU).host == 10**9


@pytest.mark.parametrize("value", ["cpu=32GB", "host=32GB", "CPU = 32GB", {"cpu": "32GB"}, {"cpu": 32 * 10**9},
                                   "cpu=32GB,"])
def test_per_device_forms_set_the_host_budget(value):
    assert parse_budget(value, CPU).host == 32 * 10**9


@pytest.mark.parametrize("value", ["cuda=20GB", "gpu=4GB", "cpu=32GB,cuda=20GB", {"cuda": "20GB"}, "device=1GB"])
def test_a_device_budget_is_refused_on_a_cpu_sweep(value):
    with pytest.raises(MemoryBudgetError, match="CUDA device, but this sweep runs on the CPU") as info:
        parse_budget(value, CPU)
    assert "host budget alone" in str(info.value)  # says what to do instead


@pytest.mark.parametrize("value, named", [("disk=1GB", "'disk'"), ({"disk": "1GB"}, "'disk'"),
                                          ("ram=1GB", "'ram'")])
def test_an_unknown_key_is_named(value, named):
    with pytest.raises(MemoryBudgetError, match="unknown key") as info:
        parse_budget(value, CPU)
    assert named in str(info.value) and "cpu=" in str(info.value)


@pytest.mark.parametrize("value, shown", [("cpu=", "''"), ("cpu=lots", "'lots'"), ("cpu=5", "'5'"),
                                          ("cpu=-1GB", "'-1GB'"), ("a,b=1", "'a,b=1'")])
def test_malformed_pairs_are_refused_naming_the_value(value, shown):
    with pytest.raises(MemoryBudgetError) as info:
        parse_budget(value, CPU)
    assert shown in str(info.value)


def test_no_budget_is_a_positive_default_that_says_so():
    budget = parse_budget(None, CPU)
    assert budget.host > 0 and budget.device is None
    assert "default" in budget.source


# -- plan_memory --------------------------------------------------------------------------------------------------
# Small synthetic sizes: baseline 0, so every estimate is exact. W is one tensor's working set plus the allowance.
MODEL, PRUNABLE, NUMEL, WORKING = 1000, 400, 100, 50
W = WORKING + EVAL_ALLOWANCE
RESIDENT, FILE = MODEL + 2 * PRUNABLE + W, MODEL + W  # host bytes without the uniform cache


def plan(host: int, *, n_seeds: int = 1, device: str = "cpu", device_budget: int | None = None,
         prunable: int = PRUNABLE, **kw):
    return plan_memory(model_bytes=MODEL, prunable_bytes=prunable, prunable_numel=NUMEL, working_bytes=WORKING,
                       n_seeds=n_seeds, device=torch.device(device), baseline=0,
                       budget=Budget(host, device_budget, "test budget"), **kw)


def test_everything_fits_resident_with_the_uniform_cache():
    p = plan(10**12)
    assert (p.tier, p.cache_uniforms, p.forced) == ("resident", True, False)
    assert p.chosen.host == RESIDENT + 4 * NUMEL
    assert "memory tier: resident + uniform cache (the fastest that fits)" in p.describe()


def test_only_the_model_fits_streams_from_the_files():
    p = plan(FILE)
    assert (p.tier, p.cache_uniforms) == ("file", False)


def test_the_tier_is_lowered_before_the_cache_is_dropped_on_cpu():
    # one seed: the cache (400 B) is smaller than the two kept copies (800 B)
    cache = 4 * NUMEL
    p = plan(FILE + cache)  # file + cache fits, resident (no cache) would need FILE + 800
    assert (p.tier, p.cache_uniforms) == ("file", True)
    p = plan(RESIDENT)  # resident without the cache fits too, but file + cache comes first
    assert (p.tier, p.cache_uniforms) == ("file", True)
    p = plan(RESIDENT + cache - 1)
    assert (p.tier, p.cache_uniforms) == ("file", True)
    assert (plan(RESIDENT + cache).tier, plan(RESIDENT + cache).cache_uniforms) == ("resident", True)


def test_a_cache_bigger_than_the_kept_copies_is_dropped_first():
    # three seeds: the cache (1200 B) exceeds the two kept copies (800 B)
    p = plan(RESIDENT, n_seeds=3)
    assert (p.tier, p.cache_uniforms) == ("resident", False)
    p = plan(FILE + 4 * NUMEL * 3, n_seeds=3)
    assert (p.tier, p.cache_uniforms) == ("file", True)


def test_the_order_of_the_cpu_choices():
    p = plan(10**12)
    assert [(f.tier, f.cache_uniforms) for f in p.choices] == [
        ("resident", True), ("file", True), ("resident", False), ("host", False), ("file", False)]
    assert [f.host for f in p.choices] == [RESIDENT + 400, FILE + 400, RESIDENT, RESIDENT, FILE]
    assert all(f.device == 0 for f in p.choices)


def test_without_random_methods_there_is_no_cache_choice():
    p = plan(10**12, n_seeds=0)
    assert not any(f.cache_uniforms for f in p.choices)
    assert (p.tier, p.cache_uniforms) == ("resident", False)


def test_the_cache_grows_with_the_seeds():
    one, five = plan(10**12, n_seeds=1), plan(10**12, n_seeds=5)
    assert five.chosen.host - one.chosen.host == 4 * NUMEL * 4


def test_the_baseline_counts_against_the_budget():
    kw = dict(model_bytes=MODEL, prunable_bytes=PRUNABLE, prunable_numel=NUMEL, working_bytes=WORKING, n_seeds=1,
              device=CPU)
    p = plan_memory(baseline=10**6, budget=Budget(FILE + 10**6, None, "t"), **kw)
    assert p.tier == "file"
    with pytest.raises(MemoryBudgetError):
        plan_memory(baseline=10**6 + 1, budget=Budget(FILE + 10**6, None, "t"), **kw)


def test_no_fitting_tier_names_the_smallest_budget_that_works():
    with pytest.raises(MemoryBudgetError) as info:
        plan(1000)
    msg = str(info.value)
    assert f"smallest budget that works is host {format_size(FILE)} ({TIER_NAMES['file']})" in msg
    assert "--max-memory" in msg and "test budget" in msg  # the fix, and where the budget came from
    assert format_size(RESIDENT + 400) in msg  # every estimate is listed


def test_a_forced_tier_is_used_when_it_fits():
    p = plan(10**12, tier="file")
    assert (p.tier, p.cache_uniforms, p.forced) == ("file", True, True)
    assert "chosen by the caller" in p.describe()
    assert (plan(10**12, tier="host").tier, plan(10**12, tier="host").cache_uniforms) == ("host", False)
    p = plan(10**12, cache_uniforms=False)
    assert (p.tier, p.cache_uniforms) == ("resident", False)


def test_a_forced_tier_that_does_not_fit_is_refused_even_if_another_would():
    with pytest.raises(MemoryBudgetError) as info:
        plan(FILE + 400, tier="resident")  # file + cache would fit
    msg = str(info.value)
    assert f"host {format_size(RESIDENT)} (resident)" in msg
    assert TIER_NAMES["file"] not in msg  # only the forced tier's choices are offered


def test_an_unknown_tier_is_refused():
    with pytest.raises(MemoryBudgetError, match="unknown memory tier 'disk'") as info:
        plan(10**12, tier="disk")
    assert "resident, host, file" in str(info.value)


def test_cuda_order_is_resident_host_file_within_the_device_budget():
    prunable = 800  # the two host copies (1650 B with the working set) outweigh the model (1000 B)
    on_device = MODEL + 2 * WORKING + EVAL_ALLOWANCE  # host and file tiers keep the model and two working sets
    full = MODEL + 2 * prunable + W
    big = 10**12
    p = plan(big, device="cuda", device_budget=big, prunable=prunable)
    assert [f.tier for f in p.choices] == ["resident", "host", "file"] and p.tier == "resident"
    assert not any(f.cache_uniforms for f in p.choices)
    assert [f.device for f in p.choices] == [full, on_device, on_device]
    assert [f.host for f in p.choices] == [MODEL, 2 * prunable + WORKING, MODEL]
    assert plan(big, device="cuda", device_budget=full - 1, prunable=prunable).tier == "host"
    # the host tier keeps both copies in host memory: with less host memory, the files are streamed
    assert plan(2 * prunable + WORKING - 1, device="cuda", device_budget=full - 1, prunable=prunable).tier == "file"
    with pytest.raises(MemoryBudgetError, match=f"host {format_size(MODEL)} and cuda {format_size(on_device)}"):
        plan(big, device="cuda", device_budget=on_device - 1, prunable=prunable)


def test_asking_for_the_cache_on_cuda_does_not_demote_the_tier():
    big = 10**12
    assert plan(big, device="cuda", device_budget=big, cache_uniforms=True).tier == "resident"


# -- PeakMemory ---------------------------------------------------------------------------------------------------
_ALLOCATE = """
import torch
from deltakit.memory import PeakMemory
peak = PeakMemory(torch.device("cpu"))
peak.reset()
before = peak.host()
block = torch.ones(50 * 2**20)  # 200 MiB, written
print(peak.host() - before, float(block[-1]), peak.device_peak())
"""


def test_peak_memory_sees_an_allocation():
    # In a fresh process: in this one, memory freed by earlier tests may stay resident and serve the allocation.
    out = subprocess.run([sys.executable, "-c", _ALLOCATE], capture_output=True, text=True, check=True, timeout=120)
    grown, last, device = out.stdout.split()
    assert int(grown) >= 150 * 2**20 and float(last) == 1.0 and device == "None"


_RESET = """
import torch
from deltakit.memory import PeakMemory
peak = PeakMemory(torch.device("cpu"))
block = torch.ones(50 * 2**20)  # 200 MiB, written
block.add_(1)
high = peak.host()
del block
peak.reset()
print(int(peak.since_reset), high, peak.host())
"""


def test_reset_forgets_an_earlier_peak():
    # In a fresh process, where the freed block goes back to the system (see the test above).
    out = subprocess.run([sys.executable, "-c", _RESET], capture_output=True, text=True, check=True, timeout=120)
    since_reset, high, now = map(int, out.stdout.split())
    if not since_reset:
        pytest.skip("this system cannot reset a process's peak resident set")
    assert now < high - 100 * 2**20
