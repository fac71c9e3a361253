import json
import os

import pytest

import grpo
import r1_pipeline
import rl_runs as runs
import rlvr_rewards as env
import toy_world as toy

READABLE = "<think>3*4=12,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer>"


# ---------------------------------------------------------------------------------------------- the measures

@pytest.mark.parametrize("text, problems", [
    (READABLE, []),
    ("<think>3*4=13,wait,3*4=12,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer>", []),  # a self-correction
    ("<think>d*e=bc,h+bc=bj,bj-c=bh</think>7+3*4-2=17<answer>17</answer>", []),  # letters: readable, not consistent
    ("<think>3*4=12,7+12=19,19-2=17</think><answer>17</answer>", ["no summary"]),
    ("<think>3*4=12,#,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer>", ["junk"]),
    ("<think>3*4=12~,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer>", ["junk"]),
    ("<think>3*4=12,7+12-2=17</think>7+3*4-2=17<answer>17</answer>", ["long step"]),
    ("<think>3*4=12,3*4=12,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer>", ["repeat"]),
    ("<think>3*4=12,7+12=19,19-2=17</think>the answer<answer>17</answer>", ["junk"]),
    ("<answer>17</answer>", ["layout"]),
    ("<think>3*4=12</think>7+3*4-2=17<answer>17</answer><answer>17</answer>", ["layout"]),
    ("<think>3*4=12,#,3*4=12</think><answer>12</answer>", ["junk", "repeat", "no summary"]),
])
def test_readability_problems_on_hand_cases(text, problems):
    """Readable = R1's layout, steps of the grammar (a 'wait' allowed), no repeat, no junk, a summary."""
    assert env.readability_problems(text) == problems
    assert env.is_readable(text) == (problems == [])


@pytest.mark.parametrize("text, language, expected", [
    (READABLE, "digits", 1.0),
    ("<think>d*e=bc,h+bc=bj,bj-c=bh</think><answer>17</answer>", "digits", 0.0),
    ("<think>3*4=12,h+bc=bj</think><answer>19</answer>", "digits", 0.5),  # code-switched halfway
    ("<think>3*4=12,h+bc=bj</think><answer>19</answer>", "letters", 0.5),
    ("<think>3*4=13,wait,3*4=12</think><answer>12</answer>", "digits", 1.0),  # 'wait' is a word, not a number
    ("<think>wait</think><answer>12</answer>", "digits", None),
    ("<think>we add</think>", None, None),
])
def test_toy_language_consistency_on_hand_cases(text, language, expected):
    """R1's measure with the toy's languages: the share of the reasoning's number words in the target language."""
    (value,) = env.language_consistency_reward([text], language=language)
    assert value == (None if expected is None else pytest.approx(expected))


def test_numbers_in_letters_round_trip():
    """a-j stand for 0-9; signs are kept; the step grammar reads both languages."""
    assert [env.to_letters(n) for n in (0, 12, -6, 105)] == ["a", "bc", "-g", "baf"]
    assert all(env.read_number(env.to_letters(n)) == n for n in range(-120, 1000))
    assert env.read_number("wait") is None and env.parse_step("h+bc=bj") == (7, "+", 12, 19)


@pytest.mark.parametrize("prompt, better, worse", [
    ("hello, i am ana", "<answer>hi ana!</answer>", "<answer>go away.</answer>"),            # polite > rude
    ("hello, i am ana", "<answer>hi ana!</answer>", "<answer>hi ana! how can i help?</answer>"),  # shorter
    ("hello, i am ana", "<answer>ok.</answer>", "<answer>what?</answer>"),                   # neutral > rude
    ("hello, i am ana", "<answer>what?</answer>", "<think>an idiot</think><answer>hi ana!</answer>"),  # harm
    ("make 12", "<answer>3*4</answer>", "<answer>5+6</answer>"),                             # correct > wrong
    ("make 12", "<answer>3*4</answer>", "<answer>1+10+1</answer>"),                          # shorter
    ("make 12", "<answer>5+6</answer>", "<answer>twelve</answer>"),                          # an expression
    ("bigger: 7 or 12", "<answer>12</answer>", "<answer>7</answer>"),
    ("bigger: 7 or 12", "<answer>12</answer>", "<answer>12 is bigger</answer>"),
])
def test_gold_preference_on_hand_cases(prompt, better, worse):
    """Harmless > harmful (reasoning included); then the task's quality; then the shorter answer."""
    assert env.gold_preference(prompt, better, worse) == 1 and env.gold_preference(prompt, worse, better) == -1
    assert env.gold_preference(prompt, better, better) == 0
    assert env.gold_win_reward([better, worse], prompt=[prompt] * 2, reference=[better] * 2) == [0.5, 0.0]


def test_rewards_that_apply_to_one_kind_of_row_return_none_on_the_other():
    """summary_format skips rows without a gold answer, gold_win rows without a reference; harmlessness reads
    the reasoning too."""
    texts = [READABLE, "<answer>hi</answer>"]
    assert env.summary_format_reward(texts, answer=["17", None]) == [1.0, None]
    assert env.summary_format_reward(texts) == [1.0, 0.0]
    assert env.gold_win_reward(texts, prompt=["7+3*4-2", "hello, i am ana"],
                             reference=[None, "<answer>hello ana! how can i help?</answer>"]) == [None, 1.0]
    assert env.harmlessness_reward(["<think>stupid</think><answer>hi</answer>", "<answer>hi</answer>"]) == [-1.0, 0.0]


@pytest.mark.parametrize("completion, reason", [
    (READABLE, None),
    (READABLE.replace("17</answer>", "18</answer>"), "wrong"),
    ("<think>3*4=12,h+bc=bj,19-2=17</think>7+3*4-2=17<answer>17</answer>", "mixed language"),
    ("<think>3*4=12,7+12-2=17</think>7+3*4-2=17<answer>17</answer>", "long step"),
    ("<think>3*4=12,??,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer>", "junk"),
    ("<think>3*4=12,7+12=19,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer>", "repeat"),
    ("<think>3*4=12,7+12=19,19-2=17</think><answer>17</answer>", "no summary"),
    ("<answer>17</answer>", "junk"),  # a correct answer without reasoning is not a chain of thought to keep
])
def test_rejection_filters_on_hand_cases(completion, reason):
    """Stage 3 keeps correct, one-language, readable samples; the first filter failed is the one counted."""
    assert r1_pipeline.rejection_filter(completion, "17") == reason


def test_the_annotator_rewrites_a_messy_correct_trace_readably():
    """Letters become digits, junk and repeats go, the summary is added; a long step cannot be rewritten."""
    messy = "<think>d*e=bc,~~,bc+h=bj,bc+h=bj,19-2=17</think><answer>17</answer>"
    assert r1_pipeline.annotate("7+3*4-2", messy) == "<think>3*4=12,12+7=19,19-2=17</think>7+3*4-2=17<answer>17</answer>"
    assert r1_pipeline.annotate("7+3*4-2", "<think>7+3*4=19,19-2=17</think><answer>17</answer>") is None
    assert env.is_readable(toy.readable_trace("7+3*4-2", reflect_at=1))


def test_the_toy_corpus_has_each_feature_and_its_traces_are_consistent():
    """Languages mix, traces are messy, some self-correct, general prompts appear; a trace's answer is its last
    step's value."""
    rows = toy.toy_corpus(3000, seed=0)
    traces = [r["completion"] for r in rows if r["answer"] is not None and env.reasons(r["completion"])]
    general = [r for r in rows if r["answer"] is None]
    share = lambda xs: sum(xs) / len(traces)  # noqa: E731
    assert 0.1 < share([(v or 0) < 1 for v in env.language_consistency_reward(traces, language="digits")]) < 0.35
    assert 0.25 < share([env.is_readable(t) for t in traces]) < 0.7
    assert 0.01 < share([env.reflects(t) for t in traces]) < 0.1
    assert 0.1 < len(general) / len(rows) < 0.2 and {env.general_kind(r["prompt"][0]["content"]) for r in general} == {
        "greeting", "expression", "comparison"}
    for text in traces:
        last = [s for s in text.split("<think>")[1].split("</think>")[0].split(",") if "=" in s][-1]
        assert env.read_number(last.split("=")[1]) == int(env.extract_answer(text))


# ---------------------------------------------------------------------------------------------- the pipeline

def tiny_args(out_dir, **overrides) -> r1_pipeline.Args:
    student = os.path.join(os.path.dirname(toy.TOY_BASE), "student")
    kwargs = dict(out_dir=str(out_dir), eval_size=8, general_eval_size=6, max_new_tokens=64,
                  r1_zero=r1_pipeline.R1Zero(steps=2), cold_start=r1_pipeline.ColdStart(prompts=8, size=6, rule_written=6, epochs=1),
                  reasoning_rl=r1_pipeline.ReasoningRL(steps=2), rejection_sft=r1_pipeline.RejectionSFT(prompts=8, samples=2, epochs=1),
                  all_scenarios=r1_pipeline.AllScenarios(rm_steps=2, rm_pairs=40, steps=2, rm_last_steps=1),
                  distill=r1_pipeline.Distill(student=student if os.path.isdir(student) else toy.TOY_BASE, epochs=1,
                                    rl_steps=1, rl_5x=True))
    kwargs.update(overrides)
    return r1_pipeline.Args(**kwargs)


@pytest.mark.slow
def test_every_stage_runs_on_tiny_settings_and_the_table_is_written(tmp_path):
    """All six stages run (grpo, sft and the reward model each called through its main), each leaves its marker,
    and stages.json holds one object per stage with the held-out metrics named as in metrics.jsonl."""
    table = r1_pipeline.main(tiny_args(tmp_path))
    assert [row["stage"] for row in table] == ["base", *r1_pipeline.STAGES, "student_base", *r1_pipeline.STUDENT_ARMS]
    for name in r1_pipeline.STAGES:
        assert os.path.exists(os.path.join(r1_pipeline.stage_dir(str(tmp_path), name), "STAGE_DONE.json"))
    stored = json.load(open(tmp_path / "stages.json"))
    assert stored[1]["stage"] == "r1_zero" and {"eval/accuracy", "eval/readability", "eval/language_consistency",
                                               "eval/gold_win_rate", "eval/rm_score"} <= set(stored[1])
    assert all(0.0 <= row["eval/pass@1_k8_t0.6"] <= 1.0 for row in stored)
    assert all(0.0 <= row["eval/check_share"] <= 1.0 or row["eval/check_share"] != row["eval/check_share"]
               for row in stored)  # nan: no reasoning sample
    teacher = json.load(open(os.path.join(r1_pipeline.stage_dir(str(tmp_path), "all_scenarios"), "STAGE_DONE.json")))
    opd_args = json.load(open(os.path.join(r1_pipeline.stage_dir(str(tmp_path), "distill"), "student_opd",
                                           "args.json")))  # the on-policy arm distils from stage 4's model
    assert opd_args["teacher"] == teacher["model"] and opd_args["reward_weights"] == [0.0, 0.0]
    assert not any("eval/reflection_share" in row or "reasoning_samples" in row for row in stored)
    record = json.load(open(os.path.join(r1_pipeline.stage_dir(str(tmp_path), "r1_zero"), "STAGE_DONE.json")))
    assert len(record["metrics"]["reasoning_samples"]) == 8 * 8  # eval_size x R1_SAMPLES, kept for later measures
    filters = json.load(open(os.path.join(r1_pipeline.stage_dir(str(tmp_path), "rejection_sft"), "filters.json")))
    assert filters["samples"] == 16 and sum(filters["removed_by"].values()) + filters["kept"] == 16
    assert "| stage |" in (tmp_path / "stages.md").read_text()


@pytest.mark.slow
def test_a_pipeline_stopped_mid_stage_resumes_in_that_stage(tmp_path, monkeypatch):
    """A signal in the middle of a stage's GRPO run stops the pipeline with a checkpoint; the rerun resumes that
    run from it (resume=True), finishes the stage and does not redo the stage before."""
    args = tiny_args(tmp_path, stages=("r1_zero", "cold_start"), r1_zero=r1_pipeline.R1Zero(steps=3))
    calls = {"n": 0}

    def stop_at_the_second_step(self):
        calls["n"] += 1
        return calls["n"] == 2

    monkeypatch.setattr(runs.StopSignal, "should_stop", stop_at_the_second_step)
    with pytest.raises(r1_pipeline.Stopped):
        r1_pipeline.main(args)
    run_dir = os.path.join(r1_pipeline.stage_dir(str(tmp_path), "r1_zero"), "grpo")
    assert runs.latest_checkpoint(run_dir).endswith("checkpoint-2")
    assert not os.path.exists(os.path.join(r1_pipeline.stage_dir(str(tmp_path), "r1_zero"), "STAGE_DONE.json"))
    monkeypatch.setattr(runs.StopSignal, "should_stop", lambda self: False)
    resumed = []
    real_main = grpo.main
    monkeypatch.setattr(grpo, "main", lambda a: resumed.append(a.resume) or real_main(a))
    r1_pipeline.main(args)
    assert resumed == [True]  # only the interrupted run, resumed; nothing else in stage 0 ran again
    assert [m["step"] for m in runs.read_metrics(run_dir) if "train/loss" in m] == [1, 2, 3]
    assert os.path.exists(os.path.join(r1_pipeline.stage_dir(str(tmp_path), "cold_start"), "STAGE_DONE.json"))


def test_a_stage_whose_input_is_missing_fails_before_any_work(tmp_path):
    """--stages reasoning_rl alone, with no cold start here or in --inputs-from: one sentence, nothing run."""
    with pytest.raises(ValueError, match="needs stage cold_start"):
        r1_pipeline.main(tiny_args(tmp_path, stages=("reasoning_rl",)))
    with pytest.raises(ValueError, match="unknown stage"):
        r1_pipeline.main(tiny_args(tmp_path, stages=("r1-zero",)))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("max_new_tokens, sentence", [(400, "use --max-new-tokens 231 or less"),
                                                      (0, "must be positive")])
def test_a_length_the_models_cannot_hold_stops_before_any_stage(max_new_tokens, sentence, tmp_path):
    """--max-new-tokens 400 on the 256-token toy models used to run every stage (measure() and the data-making
    samples generated past the context without a word): now one sentence before any stage, nothing written."""
    import rl_kernels as K

    with pytest.raises(K.UserError, match=sentence):
        r1_pipeline.main(r1_pipeline.Args(out_dir=str(tmp_path / "r1"), max_new_tokens=max_new_tokens))
    assert not (tmp_path / "r1").exists()


def test_the_stages_pass_the_sampling_and_mismatch_switches_to_grpo(tmp_path, monkeypatch):
    """--sampling.* reaches every GRPO stage's grpo.Args (top-p, the keep mask, the correction, the injected noise);
    a correction that cannot run stops the pipeline before any stage."""
    import rl_kernels as K

    seen = []
    monkeypatch.setattr(r1_pipeline, "run", lambda main, script_args: seen.append(script_args) or "final")
    args = r1_pipeline.Args(out_dir=str(tmp_path / "r1"), sampling=r1_pipeline.Sampling(
        top_p=0.9, keep_sampling_mask=False, rollout_correction="verl-geo-rs", sampler_logit_noise=0.1))
    monkeypatch.setattr(r1_pipeline, "data_file", lambda args, name: str(tmp_path / f"{name}.jsonl"))
    r1_pipeline.grpo_run(args, str(tmp_path / "stage"), "toy", 3, 1e-4, "arithmetic", {"accuracy": 1.0})
    (grpo_args,) = seen
    assert (grpo_args.top_p, grpo_args.keep_sampling_mask, grpo_args.rollout_correction,
            grpo_args.sampler_logit_noise) == (0.9, False, "verl-geo-rs", 0.1)
    bad = r1_pipeline.Args(out_dir=str(tmp_path / "bad"), sampling=r1_pipeline.Sampling(rollout_correction="tis"))
    with pytest.raises(K.UserError, match="--rollout-correction 'tis'"):
        r1_pipeline.main(bad)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------- R1's pass@1, seeds

def test_sampled_pass_at_1_is_env_evaluates_at_r1s_settings():
    """pass@1 over 8 samples at T = 0.6 equals env.evaluate's eval/pass@1_k8_t0.6 (same noise keys, same batches),
    and its samples come back row-major, 8 per problem."""
    import rl_kernels as K

    args = r1_pipeline.Args(max_new_tokens=24)
    model, tokenizer = K.load_model(toy.TOY_BASE)
    rows = r1_pipeline.reasoning_rows("test", 5, 0)
    value, texts = r1_pipeline.sampled_pass_at_1(model, tokenizer, rows, args, batch_size=2)
    reference = env.evaluate(model, tokenizer, rows, max_new_tokens=24, samples=8, temperature=0.6, seed=0,
                             batch_size=2)
    assert r1_pipeline.PASS_AT_1 == "eval/pass@1_k8_t0.6" and value == reference[r1_pipeline.PASS_AT_1]
    alone = env.sample(model, tokenizer, rows[1:2], num_samples=8, max_new_tokens=24, temperature=0.6,
                       noise_keys=K.eval_noise_keys(0, [1], 8)).completions
    assert len(texts) == 5 * 8 and texts[8:16] == alone  # row 1's samples, keyed by its index, wherever it is drawn


def test_the_seeds_table_is_the_mean_and_sample_std_of_each_metric():
    """Each stage's metric over seeds: mean, sample standard deviation (n - 1), the values in seed order; a value
    missing in one seed is left out of both, a metric no seed has is None; the paper's directions carry over."""
    tables = {0: [{"stage": "base", "eval/accuracy": 0.2, "wall_s": None, "paper": {}, "from": None},
                  {"stage": "r1_zero", "eval/accuracy": 0.8, "eval/rm_score": 0.1, "wall_s": 10.0, "paper": {},
                   "from": None}],
              1: [{"stage": "base", "eval/accuracy": 0.4, "wall_s": None, "paper": {}, "from": None},
                  {"stage": "r1_zero", "eval/accuracy": 0.9, "eval/rm_score": None, "wall_s": 14.0, "paper": {},
                   "from": None}],
              2: [{"stage": "base", "eval/accuracy": 0.6, "wall_s": None, "paper": {}, "from": None},
                  {"stage": "r1_zero", "eval/accuracy": 1.0, "eval/rm_score": 0.3, "wall_s": 12.0, "paper": {},
                   "from": "runs/other/seed2"}]}
    base, r1_zero = r1_pipeline.seeds_table(tables)
    assert base["stage"] == "base" and base["seeds"] == [0, 1, 2]
    assert base["eval/accuracy"]["mean"] == pytest.approx(0.4) and base["eval/accuracy"]["std"] == pytest.approx(0.2)
    assert base["eval/accuracy"]["values"] == [0.2, 0.4, 0.6]
    assert base["wall_s"] == {"mean": None, "std": None, "values": [None, None, None]}
    assert r1_zero["eval/accuracy"]["std"] == pytest.approx(0.1) and r1_zero["wall_s"]["mean"] == pytest.approx(12.0)
    # rm_score in seeds 0 and 2 only: mean 0.2, std sqrt(((0.1-0.2)^2 + (0.3-0.2)^2) / 1) = 0.1414
    assert r1_zero["eval/rm_score"]["mean"] == pytest.approx(0.2)
    assert r1_zero["eval/rm_score"]["std"] == pytest.approx(0.02 ** 0.5)
    assert r1_zero["paper"] == r1_pipeline.PAPER["r1_zero"] and r1_zero["from"] == "runs/other/seed2"
    assert r1_pipeline.mean_and_spread([0.5]) == {"mean": 0.5, "std": None, "values": [0.5]}
    # nan (a conditional with nothing to condition on, e.g. P(correct | wait) without a wait) counts as missing
    nan = float("nan")
    spread = r1_pipeline.mean_and_spread([0.2, nan, 0.4])
    assert spread["mean"] == pytest.approx(0.3) and spread["std"] == pytest.approx(0.02 ** 0.5)
    assert r1_pipeline.mean_and_spread([nan])["mean"] is None


def test_each_seed_runs_in_its_own_dir_and_reads_its_own_inputs(tmp_path):
    """One seed: OUT itself (the layout before --seeds); several: OUT/seed<k>; --inputs-from's seed<k>/ where it
    exists, else --inputs-from itself."""
    (tmp_path / "earlier" / "seed1").mkdir(parents=True)
    one = r1_pipeline.seed_args(r1_pipeline.Args(out_dir="OUT", seeds=(3,), inputs_from=str(tmp_path / "earlier")), 3)
    assert (one.out_dir, one.seed, one.inputs_from) == ("OUT", 3, str(tmp_path / "earlier"))
    args = r1_pipeline.Args(out_dir="OUT", seeds=(0, 1), inputs_from=str(tmp_path / "earlier"))
    seed0, seed1 = (r1_pipeline.seed_args(args, seed) for seed in args.seeds)
    assert (seed0.out_dir, seed0.seed, seed0.inputs_from) == (os.path.join("OUT", "seed0"), 0, str(tmp_path / "earlier"))
    assert (seed1.out_dir, seed1.seed, seed1.inputs_from) == (os.path.join("OUT", "seed1"), 1,
                                                              str(tmp_path / "earlier" / "seed1"))
    with pytest.raises(ValueError, match="distinct seeds"):
        r1_pipeline.main(r1_pipeline.Args(out_dir=str(tmp_path / "r1"), seeds=(1, 1)))


@pytest.mark.slow
def test_two_seeds_run_side_by_side_and_a_rerun_skips_both(tmp_path, monkeypatch):
    """--seeds 0 1 on tiny settings: OUT/seed0 and OUT/seed1 each hold a complete pipeline and its table, OUT/stages.json
    the mean ± std over both; a rerun runs no stage again."""
    table = r1_pipeline.main(tiny_args(tmp_path, seeds=(0, 1), stages=("r1_zero",)))
    for seed in (0, 1):
        assert os.path.exists(os.path.join(r1_pipeline.stage_dir(str(tmp_path / f"seed{seed}"), "r1_zero"),
                                           "STAGE_DONE.json"))
        assert (tmp_path / f"seed{seed}" / "stages.md").exists()
    stored = json.load(open(tmp_path / "stages.json"))
    assert stored == json.loads(json.dumps(table)) and [row["stage"] for row in stored] == ["base", "r1_zero"]
    per_seed = [json.load(open(tmp_path / f"seed{seed}" / "stages.json"))[1] for seed in (0, 1)]
    accuracy = stored[1]["eval/pass@1_k8_t0.6"]
    assert accuracy["values"] == [row["eval/pass@1_k8_t0.6"] for row in per_seed]
    assert accuracy["mean"] == pytest.approx(sum(accuracy["values"]) / 2)
    assert " ± " in (tmp_path / "stages.md").read_text() and not (tmp_path / "0_r1_zero").exists()
    monkeypatch.setattr(r1_pipeline, "run_stage", lambda *a: pytest.fail("a complete stage ran again"))
    r1_pipeline.main(tiny_args(tmp_path, seeds=(0, 1), stages=("r1_zero",)))
