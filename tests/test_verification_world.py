"""The verification world (toy_world.TOY_WORLDS): the premises its bases are built on, pinned on the corpus, and the
measures that read checks, waits and redos back out of samples (toy_world.read_trace, trace_stats)."""
import hashlib
import json
import random

import pytest

import rlvr_rewards as env
import toy_world as toy


def stats_of(world: str, n: int = 6000, **recipe) -> dict:
    """trace_stats of the world's arithmetic rows (recipe overrides: e.g. no messiness)."""
    saved = toy.TOY_WORLDS[world]
    toy.TOY_WORLDS[world] = dict(saved, **recipe)
    try:
        rows = [r for r in toy.toy_corpus(n, seed=5, world=world) if r["answer"] is not None]
    finally:
        toy.TOY_WORLDS[world] = saved
    return toy.trace_stats([r["completion"] for r in rows], [r["answer"] for r in rows],
                           [r["prompt"][0]["content"] for r in rows])


def test_the_toy_bases_corpus_is_unchanged_by_the_verification_world():
    # toy/base is rebuilt from toy_corpus(..., world="toy"); the verification world must not move its random stream
    rows = toy.toy_corpus(3000, 1, "train")
    assert hashlib.md5(json.dumps(rows).encode()).hexdigest() == "10c36e8b470ee97f3a5a8b4e35985cde"


def test_checks_and_redos_on_hand_cases():
    assert toy.check_step(12, "*", 7, 84) == ([2, "*", 7, "=", 14], True)
    assert toy.check_step(12, "*", 7, 82) == ([2, "*", 7, "=", 14], False)
    assert toy.check_step(7, "+", 12, 19) == ([7, "+", 2, "=", 9], True)
    assert toy.check_step(23, "-", 5, 18) == ([8, "+", 5, "=", 13], True)   # the inverse: 8+5 ends in 23's 3
    assert toy.check_step(23, "-", 5, 17)[1] is False
    assert toy.verdict_step(12, "*", 7, 84) == [4, "-", 4, "=", 0]
    assert toy.verdict_step(12, "*", 7, 82) == [4, "-", 2, "=", 2]
    assert toy.verdict_step(23, "-", 5, 18) == [3, "-", 3, "=", 0]
    assert toy.is_hard(7, "+", 12) and toy.is_hard(12, "-", 3) and not toy.is_hard(3, "*", 4)
    assert not toy.is_hard(2, "-", 12)  # a negative result: no units-digit check
    # every slip of every hard step of the task fails its check: the check can always catch it
    for row in env.make_dataset("arithmetic", split="train", n=500, seed=0):
        for step in toy.arithmetic_trace(*toy.parse_arithmetic(row["prompt"])):
            a, op, b, c = env.parse_step(step)
            if toy.is_hard(a, op, b):
                assert toy.check_step(a, op, b, c)[1]
                assert all(not toy.check_step(a, op, b, toy._off(c, s))[1] for s in toy.SLIPS)
                assert all(toy.verdict_step(a, op, b, toy._off(c, s))[4] != 0 for s in toy.SLIPS)


def test_read_trace_finds_checks_waits_and_redos():
    steps = toy.read_trace("<think>3*4=12,7+12=18,7+2=9,9-8=1,wait,7+12=19,19-2=17,7+2=9,9-9=0</think><answer>17</answer>")
    assert [s["step"] for s in steps] == [(3, "*", 4, 12), (7, "+", 12, 18), (19, "-", 2, 17)]
    assert [s["wrong"] for s in steps] == [False, True, False]
    assert [s["check"] for s in steps] == [None, False, True]
    assert [s["wait"] for s in steps] == [False, True, False]
    assert steps[1]["redo_right"] is True
    assert env.is_readable("<think>3*4=12,7+12=19,7+2=9,9-9=0,19-2=17,7+2=9,9-9=0</think>7+3*4-2=17<answer>17</answer>")
    # without a check; a wrong rewrite after "wait"; letters read like digits
    steps = toy.read_trace("<think>d*e=bc,bc*b=bd,wait,bc*b=bf</think><answer>bf</answer>")
    assert steps[1]["wait"] and steps[1]["check"] is None and steps[1]["redo_right"] is False
    stats = toy.trace_stats(["<think>3*4=12,7+12=18,7+2=9,9-8=1,wait,7+12=19</think><answer>19</answer>",
                             "<think>3*4=12,7+12=18</think><answer>18</answer>", "<answer>19</answer>"],
                            ["19", "19", "19"], ["7+3*4"] * 3)
    assert stats["reasoning_share"] == pytest.approx(2 / 3) and stats["check_share"] == 0.5
    assert stats["p_wait_wrong_step"] == 0.5 and stats["p_correct_wait"] == 1.0
    assert stats["p_correct_wrong_no_wait"] == 0.0 and stats["accuracy"] == pytest.approx(2 / 3)


def test_the_main_world_checks_rarely_and_waits_exactly_when_a_check_fails():
    clean = stats_of("toy-checks", repeat=0.0, junk=0.0)
    # (not exactly 1: read_trace takes a next step that happens to have a check's operands for a check, 12-9=5,5+9)
    assert clean["p_wait_failed_check"] > 0.97 and clean["p_wait_passed_check"] == 0.0
    assert clean["p_redo_right"] == 1.0
    assert clean["p_correct_wait"] > 0.9                 # the redo fixes the slip (the rest: an uncaught easy error)
    assert clean["p_correct_wrong_no_wait"] < 0.05       # an unchecked slip propagates to the answer
    assert 0.05 < clean["check_share"] < 0.15            # checks are rare in the base's corpus, and correct
    assert clean["p_wait_right_step"] == 0.0
    messy = stats_of("toy-checks")                       # with the corpus's messiness the trigger still holds
    assert messy["p_wait_failed_check"] > 0.9 and messy["p_wait_passed_check"] < 0.01


def test_the_controls_differ_from_the_main_world_in_one_thing_each():
    none, random_wait, wrong = (stats_of(w, repeat=0.0, junk=0.0)
                                for w in ("toy-no-checks", "toy-random-wait", "toy-wrong-redo"))
    assert none["check_share"] < 0.005 and none["wait_share"] == 0.0   # (a) no checks (read_trace's rare misreads)
    assert random_wait["check_share"] > 0.05                                               # (b) checks, but
    assert abs(random_wait["p_wait_failed_check"] - random_wait["p_wait_passed_check"]) < 0.1  # a wait at random
    assert 0.35 < wrong["p_redo_right"] < 0.65 and wrong["p_wait_failed_check"] == 1.0      # (c) half-wrong redo
    assert wrong["p_correct_wait"] < 0.7


def test_the_token_cap_fits_checking_but_not_redoing_every_step():
    # the pipeline's cap (72): a checked trace without slips always fits; redoing every hard step does not fit on
    # most problems with two hard steps. No summary is written here: R1-Zero's format reward drops it, but early in a
    # run the base still writes one in about half its traces, and then a checked trace with a redo can overflow the
    # cap (docs/aha.md, "the cap control"; the asserts below hold without the summary only)
    clean = dict(toy.VERIFICATION, repeat=0.0, junk=0.0, letters=0.0, mixed=0.0, step_error=0.0, summary=0.0, check=1.0)
    rows = [r for r in env.make_dataset("arithmetic", split="train", n=2000, seed=0) if toy.hard_steps(r["prompt"]) == 2]
    rng = random.Random(0)
    checked = [toy.token_count(toy.verification_trace(r["prompt"], rng, dict(clean, hard_slip=0.0))) for r in rows]
    redo_all = [toy.token_count(toy.verification_trace(r["prompt"], rng, dict(clean, hard_slip=1.0))) for r in rows]
    assert max(checked) <= 72 - 8                    # room for the answer's tags and EOS
    assert sum(n > 72 for n in redo_all) / len(rows) > 0.5


def test_the_messy_world_reasons_rarely_and_messily_with_the_main_worlds_checks():
    """toy-messy (the cold start's job): fewer reasoning rows, mostly unreadable, and the verification logic as is."""
    assert {k for k, v in toy.TOY_WORLDS["toy-messy"].items() if toy.TOY_WORLDS["toy-checks"][k] != v} == {
        "reason_base", "reason_per_operand", "reason_precedence", "repeat", "junk", "summary"}

    def shares(world):
        rows = [r for r in toy.toy_corpus(4000, seed=5, world=world) if r["answer"] is not None]
        reasoning = [r["completion"] for r in rows if env.reasons(r["completion"])]
        return len(reasoning) / len(rows), sum(map(env.is_readable, reasoning)) / len(reasoning)

    (reason_messy, readable_messy), (reason_main, readable_main) = shares("toy-messy"), shares("toy-checks")
    assert reason_messy < 0.2 < 0.3 < reason_main
    assert readable_messy < 0.1 < 0.3 < readable_main
    # the trigger is the main world's (read without the mess: a junk item between a verdict and its wait hides it)
    assert stats_of("toy-messy", repeat=0.0, junk=0.0)["p_wait_failed_check"] > 0.97
