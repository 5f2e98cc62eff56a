"""FIM layouts shared by training and the engine."""

import numpy as np

from codecomplete.models.train.fim import (
    FimIds,
    fim_example,
    fim_prompt,
    parse_example,
    split_points,
    transform,
)

IDS = FimIds()
P, M, S, E, F = IDS.prefix, IDS.middle, IDS.suffix, IDS.eot, IDS.file_sep


def test_special_ids_match_the_tokenizer_order():
    assert (IDS.eot, IDS.prefix, IDS.middle, IDS.suffix, IDS.pad, IDS.file_sep) == (0, 1, 2, 3, 4, 5)


def test_psm_layout_is_prefix_suffix_middle():
    ex = fim_example("psm", [10, 11], [20], [30, 31], IDS).tolist()
    assert ex == [P, 10, 11, S, 20, M, 30, 31, E]


def test_spm_layout_puts_suffix_first_then_prefix_and_middle():
    ex = fim_example("spm", [10, 11], [20], [30, 31], IDS).tolist()
    assert ex == [P, S, 20, M, 10, 11, 30, 31, E]


def test_inference_prompt_is_the_training_layout_cut_before_the_middle():
    for order in ("psm", "spm"):
        full = fim_example(order, [10, 11], [20], [30, 31], IDS).tolist()
        prompt = fim_prompt(order, [10, 11], [20], IDS, header=[F, 40])
        assert prompt[:2] == [F, 40]
        assert full[: len(prompt) - 2] == prompt[2:]
        assert full[len(prompt) - 2:] == [30, 31, E]


def test_transform_recovers_prefix_middle_suffix():
    rng = np.random.default_rng(0)
    doc = np.arange(100, 160)
    seen = set()
    for _ in range(200):
        ex = transform(doc, rng, IDS, fim_rate=0.5, spm_rate=0.5)
        order, a, b, c = parse_example(ex, IDS)
        seen.add(order)
        assert ex[-1] == E and ex.tolist().count(E) == 1
        if order == "psm":  # prefix, middle, suffix
            assert a + b + c == doc.tolist()
        elif order == "spm":  # (prefix + middle), -, suffix
            assert a + c == doc.tolist()
        else:
            assert a == doc.tolist()
    assert seen == {"psm", "spm", "plain"}


def test_header_goes_first():
    ex = transform(np.arange(100, 110), np.random.default_rng(1), IDS, fim_rate=0.0,
                   header=np.array([F, 7, 8]))
    assert ex.tolist() == [F, 7, 8, *range(100, 110), E]


def test_split_points_cover_empty_parts_and_stay_in_range():
    rng = np.random.default_rng(0)
    pts = [split_points(5, rng) for _ in range(500)]
    assert all(0 <= a <= b <= 5 for a, b in pts)
    assert any(a == b for a, b in pts) and any(a == 0 for a, _ in pts) and any(b == 5 for _, b in pts)
