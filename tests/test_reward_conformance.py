"""Conformance of our rewards with TRL's (trl.rewards) and open-r1's (open_r1.rewards), as a table.

One row per case: our reward, the completion(s), the dataset columns and keyword arguments of our call, the score
open-r1 gives, the score TRL gives, ours, and for every difference the reason: "ours is right because …" or
"convention: …". The cases are their tests' cases (written here as data) plus our edge cases; a peer score that
their tests do not state was derived from their code, and `source` says so ("from its code"). A peer column holds
None where that peer has no such reward or case, and SKIPS where it returns None to skip the row.

Peers as read: open-r1 main at 1416fa0 (src/open_r1/rewards.py, tests/test_rewards.py), TRL main at f2cd577
(trl/rewards/*.py, tests/test_rewards.py), both with math-verify 0.9.0. How their inputs map onto ours:
  - their `solution` column is our `answer`; their completions are chat messages, ours the text;
  - TRL's length and repetition rewards read token ids: a length becomes our `completion_lengths`, and ids become
    words (ids [1, 2, 1] ↔ the text "1 2 1"), so one id is one word;
  - open-r1's len_reward is our kimi_length (one group = the batch); both cosine rewards are our cosine_length with
    COSINE_OPEN_R1 and their max length; open-r1's code_format_reward is compared with our format_reward, which
    checks the template only. TRL's think_format_reward and open-r1's reasoning_steps_reward have no counterpart.

`python tests/test_reward_conformance.py` prints the counts. The test asserts our value in every row (and that the
table explains each difference), so it fails when our behaviour drifts from what the table says.
"""

import math
import os
import sys
from dataclasses import dataclass, field

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlvr_rewards as env  # noqa: E402

SKIPS = "skips"  # the peer returns None for this row (does not score it)
PEER_TOLERANCE = 5e-3  # the peers' tests state some values to 2-4 decimals (0.943, -0.3846)


@dataclass(frozen=True)
class Case:
    reward: str  # our REWARDS key
    completions: tuple  # one text, or a group of texts for a group-wise reward
    columns: dict  # per-completion columns of our call (answer, completion_lengths): a value, or a tuple for a group
    open_r1: object  # open-r1's score(s), SKIPS, or None (no counterpart)
    trl: object  # TRL's score(s), SKIPS, or None
    ours: object  # our score(s)
    why: str = ""  # for each difference: "ours is right because …" or "convention: …"
    source: str = "edge case"
    kwargs: dict = field(default_factory=dict)  # keyword arguments of our call


# ------------------------------------------------------------------------------------------------ the reasons

ANCHORS = ("convention: our final answer is the last <answer>…</answer> block, else the last \\boxed{}, else GSM8K's "
           "'#### n'; the peers read only LaTeX ($…$, \\boxed{}), so they find no answer here")
MARKER = ("convention: we score only an answer the model marked as final (<answer>, \\boxed{}, '#### n'); the peers "
          "take LaTeX anywhere in the text, even mid-sentence")
WORDS = ("convention: a gold written in words is compared as text, case, spacing and \\text{} aside; TRL and "
         "open-r1 cannot parse it and skip the row")
ANAGRAM = (WORDS + "; math-verify alone would read both as products of one-letter variables and call this anagram "
           "correct")
NO_ANSWER_WORDS = ("convention: the gold is words, so it is compared as text, and this completion marks no final "
                   "answer (unparseable: 0); the peers skip the row")
UNPARSEABLE = ("convention: a gold math-verify cannot parse at all is compared as text (case and spacing aside); "
               "the peers skip the row")
PRICE_GOLD = ("ours is right because a price is its number (\\$ and 'dollars' are dropped around a plain number); "
              "the peers cannot parse a gold written with \\$ and skip the row")
ESCAPED_DOLLAR = ("ours is right because an escaped \\$ is a dollar sign, not a math delimiter, so the box holds "
                  "2√2; the peers score it 0")
ESCAPED_DOLLAR_GOLD = ("ours is right because an escaped \\$ is a dollar sign, not a math delimiter; the peers cannot "
                       "parse a gold written with \\$ and skip the row")
PRICE_ANCHOR = ("convention: the answer is in an <answer> block, which the peers do not read; we also read the "
                "price as its number")
TINY_GOLD = ("ours is right because math-verify rounds decimals to 6 places, so every number within 5e-7 of the gold "
             "matches it, a negative one too; a gold under 0.01 needs 4 significant digits here")
EXPONENT_GOLD = ("ours is right because the gold 1e-05 is the number 0.00001; the peers' first match in its text is "
                 "the number 1")
EXPONENT_ANSWER = ("ours is right because the answer 1e-05 is the number 0.00001; math-verify's LaTeX parser reads it "
                   "as Euler's e minus 5")
FRAC34 = ("ours is right because \\frac34 is valid LaTeX for 3/4; the peers parse the gold without a \\boxed{} "
          "anchor, find nothing and skip the row")
FRAC34_PRED = ("ours is right because \\boxed{\\frac34} is valid LaTeX for 3/4; the peers' normalisation leaves it "
               "unread")
INFINITY = ("ours is right because math-verify reads 'infinity' as ∞ once it is anchored in \\boxed{}; the peers "
            "parse the gold unanchored, find nothing and skip the row")
THINK_BOX = ("convention: a \\boxed{} inside <think> counts when it is the last box and there is no <answer> "
             "block (TRL's and open-r1's accuracy_reward read boxes inside <think> too); TRL's "
             "reasoning_accuracy_reward reads only what follows </think> (to require the template, add format_reward)")
ANSWER_BLOCK = ("ours is right because the <answer> block is the final answer; the peers take the \\boxed{} inside "
                "the reasoning instead")
LAST_BOX = ("ours is right because the last box is the final answer (the model corrected itself); with boxed='all' "
            "math-verify reads every box in the match as the set {3, 4}")
KIMI_UNPARSEABLE = ("convention: a gold math-verify cannot parse is not counted correct (open-r1's len_reward treats "
                    "it as correct); here the answer differs from it, so it is wrong")
COSINE_WORDS = ("convention: a gold in words is compared as text, so \\boxed{42} is wrong against 'forty two'; TRL "
                "skips the row and open-r1 counts an unparseable gold as correct (1.0)")
COSINE_PAST_MAX = ("ours is right because cos is periodic: unclamped past max_length, open-r1's reward climbs back "
                   "up to its short-length values (1.0 at twice max_length); TRL and COSINE_OPEN_R1 stay at the "
                   "long-length value")
NEWLINES = ("convention: strict means the four tags in order with only whitespace around them; open-r1 also wants "
            "a newline at each tag and nothing before <think>")
AFTER_ANSWER = ("ours is right because strict allows nothing after </answer>; under re.MULTILINE open-r1's $ matches "
                "at the end of any line, so what follows </answer> passes")
TWO_BLOCKS = ("ours is right because strict means exactly one think block and one answer block; open-r1's lazy .*? "
              "(DOTALL) runs across the second block")
CODE_FORMAT = ("convention: format_reward checks the template only (any whitespace between tags); open-r1's "
               "code_format_reward also wants a newline at each tag and a ```python block in the answer, which for "
               "us is code_reward's business (extract_code)")
TAG_NEWLINES = ("convention: we count the four tags themselves; open-r1 counts them with their newlines "
                "('<think>\\n', '\\n</think>\\n', '\\n<answer>\\n', '\\n</answer>')")
NEG_ZERO = ("ours is right because nothing repeated is no penalty, 0.0; open-r1 returns -0.0, (1 - 1)·max_penalty "
            "with max_penalty < 0 (its tests pass as -0.0 == 0.0; logs and sign checks see a penalty)")
CASE = ("convention: n-grams are case-sensitive, as the paper's and TRL's token n-grams are; open-r1 lowercases "
        "the text first")
CJK = ("convention: a CJK or kana character is one word for us (no segmenter needed); open-r1 splits on "
       "whitespace by default (one word: no repetition) or segments Chinese with jieba when language='zh' "
       "('这个' is one word there)")


# ------------------------------------------------------------------------------------------------ row builders

def acc(completion, gold, open_r1, trl, ours, why="", source="edge case"):
    return Case("accuracy", (completion,), {"answer": gold}, open_r1, trl, ours, why, source)


def fmt(text, open_r1, ours, why="", source="edge case"):
    return Case("format", (text,), {}, open_r1, None, ours, why, source)


def tags(text, open_r1, ours, why="", source="edge case"):
    return Case("tag_count", (text,), {}, open_r1, None, ours, why, source)


def rep(text, ngram_size, max_penalty, open_r1, trl, ours, why="", source="edge case"):
    return Case("repetition_penalty", (text,), {}, open_r1, trl, ours, why, source,
                {"ngram_size": ngram_size, "max_penalty": max_penalty})


def cos(completion, gold, length, open_r1, trl, ours, why="", source="edge case", **bounds):
    return Case("cosine_length", (completion,), {"answer": gold, "completion_lengths": length}, open_r1, trl, ours,
                why, source, {**env.COSINE_OPEN_R1, "max_length": 100, **bounds})


def kimi(completions, golds, open_r1, ours, why="", source="edge case"):
    return Case("kimi_length", tuple(completions), {"answer": tuple(golds)}, tuple(open_r1), None, tuple(ours), why,
                source)


def overlong(length, open_r1, trl, ours, why="", source="edge case"):
    return Case("soft_overlong", ("",), {"completion_lengths": length}, open_r1, trl, ours, why, source,
                {"max_length": 100, "cache_length": 20})


F63, F64 = r"\boxed{\frac{63}{400}}", r"\boxed{\frac{64}{400}}"
G63 = r"\frac{63}{400}"
OR1, TRL = "open-r1 test", "TRL test"
OR1_EXACT = "open-r1 test (exact values from its code)"
TRL_CODE = "TRL test (open-r1 from its code)"
OR1_EN = "edge case (open-r1 from its code, default language='en')"
BOTH = "open-r1 and TRL tests"
TRL_REASONING = "TRL reasoning_accuracy_reward test (open-r1 accuracy_reward from its code)"
CODE = "from their code"
NINE_OBJECTS = ("<think>\nI will count each distinct object in the image:\n1. Purple scooter\n2. Red bicycle\n"
                "3. Green motorcycle\n4. Gray sedan\n5. Yellow school bus\n6. Small green double-decker bus\n"
                "7. Small red car\n8. Small purple car\n9. Small gray dirt bike\n\nThere are 9 distinct objects in "
                "total.\n</think>\n<answer>\n9\n</answer>")

CASES = [
    # ---- accuracy: the peers' tests
    acc(F63, G63, 1.0, 1.0, 1.0, source=BOTH),
    acc(F64, G63, 0.0, 0.0, 0.0, source=BOTH),
    acc(r"\boxed{3}", "6", 0.0, 0.0, 0.0, source=BOTH),
    acc(F63, "63/400", 1.0, 1.0, 1.0, source="TRL test (open-r1 from its code)"),
    acc("Answer is forty two.", "Answer is forty two.", SKIPS, SKIPS, 0.0, NO_ANSWER_WORDS,
        "TRL test (open-r1 from its code)"),
    acc(r"Some other content. \boxed{43}.", "Answer is forty three.", SKIPS, SKIPS, 0.0, WORDS,
        "TRL test (open-r1 from its code)"),
    acc(r"My answer is \boxed{\frac{1}{3}}", r"\frac{1}{3}", 1.0, 1.0, 1.0, source="TRL docstring and thread test"),
    acc(r"My answer is \boxed{\frac{1}{2}}", r"\frac{1}{3}", 0.0, 0.0, 0.0,
        source="TRL docstring (open-r1 from its code)"),
    # TRL's reasoning_accuracy_reward (the TRL column) against our accuracy_reward
    acc(r"<think> Reasoning content </think> \boxed{\frac{63}{400}}", G63, 1.0, 1.0, 1.0, source=TRL_REASONING),
    acc(r"Reasoning content </think> \boxed{\frac{63}{400}}", G63, 1.0, 1.0, 1.0, source=TRL_REASONING),
    acc(r"<REASONING_START> Reasoning content </REASONING_END> \boxed{\frac{63}{400}}", G63, 1.0, 1.0, 1.0,
        source=TRL_REASONING + "; TRL given reasoning_delimiters=['</REASONING_END>']"),
    acc(r"<think> Reasoning content </think> \boxed{\frac{64}{400}}", G63, 0.0, 0.0, 0.0, source=TRL_REASONING),
    acc(r"<think> My answer is \boxed{42} </think> Some other text.", r"\boxed{42}", 1.0, 0.0, 1.0, THINK_BOX,
        TRL_REASONING),
    acc(r"<think> The answer is \boxed{42} </think> Here's a wrong answer: \boxed{43}.", r"\boxed{42}", 0.0, 0.0, 0.0,
        source=TRL_REASONING),
    acc("<think> Incomplete reasoning without closing tag", G63, 0.0, 0.0, 0.0, source=TRL_REASONING),
    acc(r"Correct answer \frac{63}{400} but completely missing reasoning content", G63, 1.0, 0.0, 0.0, MARKER,
        TRL_REASONING),
    acc(r"<think> Reasoning content </think> \boxed{42}", "forty two", SKIPS, SKIPS, 0.0, WORDS, TRL_REASONING),
    acc(r"<think> Reasoning content with partial answers \boxed{\frac{1}{3}} but no final answer", r"\frac{1}{3}",
        1.0, 0.0, 1.0, THINK_BOX, "TRL reasoning_accuracy_reward docstring (open-r1 from its code)"),

    # ---- accuracy: currency (issue 16's bug: these scored 0)
    acc(r"\boxed{\$18.90}", "18.90", 1.0, 1.0, 1.0, source=CODE),
    acc(r"<answer>\$5</answer>", "5", 0.0, 0.0, 1.0, PRICE_ANCHOR, CODE),
    acc(r"\boxed{18.90}", r"\$18.90", SKIPS, SKIPS, 1.0, PRICE_GOLD, CODE),
    acc(r"\boxed{\$1,000}", "1000", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{\$ 5}", "5", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{-\$5}", "-5", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{\$5.00}", "$5", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{\$18.90}", "18.91", 0.0, 0.0, 0.0, source=CODE),
    acc(r"\boxed{5\text{ dollars}}", "5", 1.0, 1.0, 1.0, source=CODE),
    acc("<answer>$5</answer>", "5", 0.0, 0.0, 1.0, PRICE_ANCHOR, CODE),
    acc("<answer>5 dollars</answer>", "5", 0.0, 0.0, 1.0, PRICE_ANCHOR, CODE),
    acc("<answer>1000</answer>", r"\$1,000", SKIPS, SKIPS, 1.0, PRICE_GOLD, CODE),
    acc("She pays $5 in total.\n#### $5", "5", 0.0, 0.0, 1.0, ANCHORS, CODE),
    acc(r"<answer>\$\frac{1}{2}</answer>", "0.5", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{\$5 \text{ each}}", "5", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{\$2\sqrt{2}}", r"2\sqrt{2}", 0.0, 0.0, 1.0, ESCAPED_DOLLAR, CODE),
    acc(r"\boxed{2\sqrt{2}}", r"\$2\sqrt{2}", SKIPS, SKIPS, 1.0, ESCAPED_DOLLAR_GOLD, CODE),

    # ---- accuracy: percent and thousands separators (math-verify's convention: 50% also matches 0.5)
    acc("<answer>50%</answer>", "50", 0.0, 0.0, 1.0, ANCHORS, CODE),
    acc(r"\boxed{50\%}", "0.5", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{12.5\%}", "1/8", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{50}", r"50\%", 1.0, 1.0, 1.0, source=CODE),
    acc("#### 1,000", "1000", 0.0, 0.0, 1.0, ANCHORS, CODE),
    acc(r"\boxed{1,000}", "1000", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{1{,}000}", "1000", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{1,000,000}", "1000000", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{1,5}", "1.5", 0.0, 0.0, 0.0, source=CODE),  # a decimal comma is not read as one, by anyone

    # ---- accuracy: tiny golds and the exponent form
    acc(r"\boxed{0.00000025}", "0.00000025", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{0.0000001}", "0.00000025", 1.0, 1.0, 0.0, TINY_GOLD, CODE),
    acc(r"\boxed{-0.0000002}", "0.00000025", 1.0, 1.0, 0.0, TINY_GOLD, CODE),
    acc(r"\boxed{0.00001}", "1e-05", 0.0, 0.0, 1.0, EXPONENT_GOLD, CODE),
    acc(r"\boxed{1e-05}", "0.00001", 0.0, 0.0, 1.0, EXPONENT_ANSWER, CODE),
    acc(r"\boxed{e-5}", "1e-05", 0.0, 0.0, 0.0, source=CODE),

    # ---- accuracy: golds math-verify cannot parse
    acc("<answer>forty two</answer>", "forty two", SKIPS, SKIPS, 1.0, WORDS, CODE),
    acc("<answer>Forty  Two</answer>", "forty two", SKIPS, SKIPS, 1.0, WORDS, CODE),
    acc("<answer>two forty</answer>", "forty two", SKIPS, SKIPS, 0.0, ANAGRAM, CODE),
    acc("<answer>42</answer>", "forty two", SKIPS, SKIPS, 0.0, WORDS, CODE),
    acc(r"\boxed{\text{Paris}}", "Paris", SKIPS, SKIPS, 1.0, WORDS, CODE),
    acc("<answer>yes</answer>", "Yes", SKIPS, SKIPS, 1.0, WORDS, CODE),
    acc("<answer>sey</answer>", "yes", SKIPS, SKIPS, 0.0, ANAGRAM, CODE),
    acc(r"\boxed{\infty}", "infinity", SKIPS, SKIPS, 1.0, INFINITY, CODE),
    acc("<answer>}{</answer>", "}{", SKIPS, SKIPS, 1.0, UNPARSEABLE, CODE),

    # ---- accuracy: where the final answer is (boxes inside <think>, nested boxes, several boxes)
    acc(r"<think>so \boxed{3}</think> The answer is 3.", "3", 1.0, 1.0, 1.0, source=CODE),
    acc(r"<think>\boxed{3}</think><answer>4</answer>", "3", 1.0, 1.0, 0.0, ANSWER_BLOCK, CODE),
    acc(r"<think>\boxed{3}</think><answer>\boxed{4}</answer>", "4", 1.0, 1.0, 1.0, source=CODE),
    acc(r"<think>\boxed{3} wait, no.</think> \boxed{4}", "4", 0.0, 0.0, 1.0, LAST_BOX, CODE),
    acc(r"\boxed{\boxed{3}}", "3", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{2} then \boxed{\boxed{5}}", "5", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{17}.", "17", 1.0, 1.0, 1.0, source=CODE),
    acc("<answer>17</answer> I hope that helps.", "17", 0.0, 0.0, 1.0, ANCHORS, CODE),
    acc(r"So the answer is $\frac{1}{2}$.", "0.5", 1.0, 1.0, 0.0, MARKER, CODE),

    # ---- accuracy: LaTeX fractions
    acc(r"\boxed{\dfrac{1}{2}}", "0.5", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{\tfrac{3}{4}}", "3/4", 1.0, 1.0, 1.0, source=CODE),
    acc(r"\boxed{3/4}", r"\frac{3}{4}", 1.0, 1.0, 1.0, source=CODE),
    acc(r"<answer>\frac{1}{2}</answer>", "1/2", 1.0, 1.0, 1.0, source=CODE),  # the bare \frac is LaTeX to the peers
    acc(r"\boxed{\frac34}", "0.75", 0.0, 0.0, 1.0, FRAC34_PRED, CODE),
    acc(r"\boxed{0.75}", r"\frac34", SKIPS, SKIPS, 1.0, FRAC34, CODE),

    # ---- accuracy: GSM8K's "#### n" and <answer> blocks
    acc("The answer is 72.\n#### 72", "72", 0.0, 0.0, 1.0, ANCHORS, CODE),
    acc("<answer>17</answer>", "17", 0.0, 0.0, 1.0, ANCHORS, CODE),
    acc("#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 0.0, 0.0, 1.0, ANCHORS, CODE),

    # ---- format (strict): open-r1's format_reward; TRL has none (its think_format_reward checks <think> only)
    fmt("<think>\nSome reasoning\n</think>\n<answer>\nThe answer\n</answer>", 1.0, 1.0, source=OR1),
    fmt("<think>Only thinking</think>", 0.0, 0.0, source=OR1),
    fmt("<answer>Only answer</answer>", 0.0, 0.0, source=OR1),
    fmt("No tags at all", 0.0, 0.0, source=OR1),
    fmt("<think>Missing closing</think><answer>Missing closing", 0.0, 0.0, source=OR1),
    fmt("<think>Wrong order</answer><answer>Wrong order</think>", 0.0, 0.0, source=OR1),
    fmt(NINE_OBJECTS, 1.0, 1.0, source=OR1),
    fmt("<think>a</think><answer>1</answer>", 0.0, 1.0, NEWLINES, "edge case (open-r1 from its code)"),
    fmt("  <think>\na\n</think>\n<answer>\n1\n</answer>", 0.0, 1.0, NEWLINES, "edge case (open-r1 from its code)"),
    fmt("<think>\na\n</think>\n<answer>\n1\n</answer>\n", 1.0, 1.0, source="edge case (open-r1 from its code)"),
    fmt("<think>\na\n</think>\n<answer>\n1\n</answer>\nHope this helps!", 1.0, 0.0, AFTER_ANSWER,
        "edge case (open-r1 from its code)"),
    fmt("<think>\na\n</think>\n<answer>\n1\n</answer>\n<answer>\n2\n</answer>", 1.0, 0.0, TWO_BLOCKS,
        "edge case (open-r1 from its code)"),
    fmt("<think>\na\n</think>\n<think>\nb\n</think>\n<answer>\n1\n</answer>", 1.0, 0.0, TWO_BLOCKS,
        "edge case (open-r1 from its code)"),
    # open-r1's code_format_reward (language python) against our format_reward
    fmt("<think>\nLet's solve this\nStep 1: First step\n</think>\n<answer>\n```python\ndef hello():\n"
        "    print('world')\n```\n</answer>", 1.0, 1.0, source="open-r1 code_format_reward test"),
    fmt("```python\ndef hello():\n    print('world')\n```", 0.0, 0.0, source="open-r1 code_format_reward test"),
    fmt("<think>Some thinking</think><answer>Just plain text</answer>", 0.0, 1.0, CODE_FORMAT,
        "open-r1 code_format_reward test"),
    fmt("<think>Analysis</think><answer>```javascript\nconsole.log('hello');\n```</answer>", 0.0, 1.0, CODE_FORMAT,
        "open-r1 code_format_reward test"),
    fmt("<think>Analysis</think><answer>```\ndef hello(): pass\n```</answer>", 0.0, 1.0, CODE_FORMAT,
        "open-r1 code_format_reward test"),
    fmt("<answer>```python\ndef hello(): pass\n```</answer><think>Analysis</think>", 0.0, 0.0,
        source="open-r1 code_format_reward test"),
    fmt("<think>\nHere's an example:\n```python\nx = 1\n```\nNow the solution:\n</think>\n<answer>\n```python\n"
        "def solution():\n    return 42\n```\n</answer>", 1.0, 1.0, source="open-r1 code_format_reward test"),
    fmt("<think>\nAnalysis\n</think>\n<answer>\n```javascript\nconsole.log('hello');\n```\n</answer>", 0.0, 1.0,
        CODE_FORMAT, "open-r1 code_format_reward test (language python)"),
    fmt("<think>\nHere's the analysis\n</think>\n<answer>\n```python\nclass Solution:\n    def __init__(self):\n"
        "        self.value = 42\n        \n    def get_value(self):\n        return self.value\n```\n</answer>",
        1.0, 1.0, source="open-r1 code_format_reward test"),

    # ---- tag_count: open-r1's
    tags("<think>\nSome reasoning\n</think>\n<answer>\nThe answer\n</answer>", 1.0, 1.0, source=OR1),
    tags("Some reasoning\n</think>\n<answer>\nThe answer\n</answer>", 0.75, 0.75, source=OR1),
    tags("<think>\nSome reasoning\n<answer>\nThe answer\n</answer>", 0.75, 0.75, source=OR1),
    tags("<think>\nSome reasoning\n</think>\nThe answer\n</answer>", 0.75, 0.75, source=OR1),
    tags("<think>\nSome reasoning\n</think>\n<answer>\nThe answer", 0.75, 0.75, source=OR1),
    tags("Some reasoning\nThe answer", 0.0, 0.0, source=OR1),
    tags("<think>a</think><answer>1</answer>", 0.0, 1.0, TAG_NEWLINES, "edge case (open-r1 from its code)"),
    tags("<think>\na\n</think>\n<answer>\n1\n</answer>\n<answer>\n2\n</answer>", 0.5, 0.5,
         source="edge case (open-r1 from its code)"),

    # ---- kimi_length: open-r1's len_reward (one group: the batch; lengths in characters)
    kimi([F63, F64], [G63] * 2, [0.0, 0.0], [0.0, 0.0], source=OR1),
    kimi([F63, F63 + "  " + "x" * 10], [G63] * 2, [0.5, -0.5], [0.5, -0.5], source=OR1_EXACT),
    kimi([F64, F64 + "  " + "x" * 10], [G63] * 2, [0.0, -0.5], [0.0, -0.5], source=OR1_EXACT),
    kimi([F63, F63 + "  " + "x" * 10, F64, F64 + "  " + "x" * 10], [G63] * 4, [0.5, -0.5, 0.0, -0.5],
         [0.5, -0.5, 0.0, -0.5], source=OR1_EXACT),
    kimi([r"\boxed{answer}", r"\boxed{answer} " + "x" * 10], ["unparseable_latex"] * 2, [0.5, -0.5], [0.0, -0.5],
         KIMI_UNPARSEABLE, OR1),

    # ---- cosine_length with COSINE_OPEN_R1 and max_length 100: open-r1's (characters) and TRL's (token ids)
    cos(F63, G63, 22, 0.943, None, 0.9426283106939473, source=OR1 + " (the 22-character box is not padded)"),
    cos(F63 + " " * 58, G63, 80, 0.547, None, 0.5477457514062631, source=OR1),
    cos(F64, G63, 22, -0.942, None, -0.9426283106939473, source=OR1),
    cos(F64 + " " * 58, G63, 80, -0.547, None, -0.5477457514062631, source=OR1),
    # TRL's cases (lengths in token ids); open-r1's formula, at the same length, gives our values
    *[cos(box, r"\frac{1}{3}", length, ours, trl, ours, source=TRL + " (open-r1 from its code, at that length)")
      for box, length, trl, ours in [
          (r"\boxed{\frac{1}{3}}", 25, 0.92678, 0.9267766952966369),
          (r"\boxed{\frac{1}{3}}", 75, 0.57322, 0.5732233047033631),
          (r"\boxed{\frac{1}{2}}", 25, -0.92678, -0.9267766952966369),
          (r"\boxed{\frac{1}{2}}", 75, -0.57322, -0.5732233047033631),
          (r"\boxed{\frac{1}{3}}", 50, 0.75, 0.75), (r"\boxed{\frac{1}{2}}", 50, -0.75, -0.75),
          (r"\boxed{\frac{1}{3}}", 0, 1.0, 1.0), (r"\boxed{\frac{1}{3}}", 100, 0.5, 0.5),
          (r"\boxed{\frac{1}{2}}", 0, -1.0, -1.0), (r"\boxed{\frac{1}{2}}", 100, -0.5, -0.5)]],
    cos(r"\boxed{\frac{1}{3}}", r"\frac{1}{3}", 200, 1.0, 0.5, 0.5, COSINE_PAST_MAX, TRL_CODE),
    cos(r"\boxed{\frac{1}{2}}", r"\frac{1}{3}", 200, -1.0, -0.5, -0.5, COSINE_PAST_MAX, TRL_CODE),
    cos(r"\boxed{\frac{1}{3}}", r"\frac{1}{3}", 150, 0.75, 0.5, 0.5, COSINE_PAST_MAX, CODE),
    cos(r"\boxed{42}", "forty two", 50, 1.0, SKIPS, -0.75, COSINE_WORDS, TRL_CODE),
    cos(r"\boxed{\frac{1}{3}}", r"\frac{1}{3}", 50, 1.0, 1.0, 1.0, source=TRL_CODE,
        min_value_correct=0.0, max_value_correct=2.0),

    # ---- repetition_penalty: open-r1's tests (text), TRL's tests (token ids written as words)
    rep("this is a test sentence", 2, -1.0, -0.0, None, 0.0, NEG_ZERO, OR1 + " (its code gives -0.0)"),
    rep("this this this this this", 2, -1.0, -0.75, None, -0.75, source=OR1),
    rep("that that that that that", 2, -1.0, -0.75, None, -0.75, source=OR1),
    rep("this is a this is a test", 2, -1.0, -1 / 3, None, -1 / 3, source=OR1),
    rep("this is a test", 3, -0.5, -0.0, None, 0.0, NEG_ZERO, OR1 + " (its code gives -0.0)"),
    rep("test test test test", 3, -0.5, -0.25, None, -0.25, source=OR1),
    rep("", 2, -1.0, 0.0, None, 0.0, source=OR1),
    rep("this is a this is a test", 3, -2.0, -0.4, None, -0.4, source=OR1),
    rep("This is A Test", 2, -1.0, -0.0, None, 0.0, NEG_ZERO, OR1 + " (its code gives -0.0)"),
    rep("this IS a test", 2, -1.0, -0.0, None, 0.0, NEG_ZERO, OR1 + " (its code gives -0.0)"),
    rep("word", 3, -1.0, 0.0, None, 0.0, source=OR1),
    rep("two words", 3, -1.0, 0.0, None, 0.0, source=OR1),
    rep("three different words", 3, -1.0, -0.0, None, 0.0, NEG_ZERO, OR1 + " (its code gives -0.0)"),
    rep("word word word word", 3, -1.0, -0.5, None, -0.5, source=OR1),
    rep("one two one two", 3, -1.0, -0.0, None, 0.0, NEG_ZERO, OR1 + " (its code gives -0.0)"),
    rep("A B C A B", 3, -0.5, -0.0, None, 0.0, NEG_ZERO, OR1 + " (its code gives -0.0)"),
    rep("A B C A B C", 3, -1.0, -0.25, None, -0.25, source=OR1),
    rep("A B C A B C E F G A B C A B C", 3, -1.0, -0.3846, None, -5 / 13, source=OR1),
    rep("A B C D E F G H I J K L", 3, -1.0, -0.0, None, 0.0, NEG_ZERO, OR1 + " (its code gives -0.0)"),
    rep("这个这个这个这个这个", 2, -1.0, -0.75, None, -7 / 9, CJK, OR1 + " (language='zh')"),
    rep("1 2 3 4", 2, -1.0, -0.0, 0.0, 0.0, NEG_ZERO, TRL_CODE),
    rep("5 5 5 5 5", 2, -1.0, -0.75, -0.75, -0.75, source=TRL_CODE),
    rep("1 2 1 2 1 2", 2, -1.0, -0.6, -0.6, -0.6, source=TRL_CODE),
    rep("1 2", 3, -1.0, 0.0, 0.0, 0.0, source=TRL_CODE),
    rep("1 2 3", 3, -1.0, -0.0, 0.0, 0.0, NEG_ZERO, TRL_CODE),
    rep("", 3, -1.0, 0.0, 0.0, 0.0, source=TRL_CODE),
    rep("5 5 5 5 5", 2, -0.5, -0.375, -0.375, -0.375, source=TRL_CODE),
    rep("1 2 3 1 2 3", 2, -1.0, -0.4, -0.4, -0.4, source=TRL_CODE),
    rep("1 2 3 1 2 3", 3, -1.0, -0.25, -0.25, -0.25, source=TRL_CODE),
    rep("9", 2, -1.0, 0.0, 0.0, 0.0, source=TRL_CODE),
    rep("a b c d", 3, -1.0, -0.0, 0.0, 0.0, NEG_ZERO, CODE),  # issue 16: ours was -0.0 too
    rep("the cat the cat The cat", 2, -1.0, -0.6, None, -0.2, CASE, "edge case (open-r1 from its code)"),
    rep("我们相加我们相加", 2, -1.0, 0.0, None, -3 / 7, CJK, OR1_EN),
    rep("そうですそうです", 2, -1.0, 0.0, None, -3 / 7, CJK, OR1_EN),
    rep("我们把两个数相加", 3, -1.0, 0.0, None, 0.0, source=OR1_EN),

    # ---- soft_overlong: max_length 100, cache 20 (both peers' tests; the boundaries from their code)
    overlong(50, 0.0, 0.0, 0.0, source=BOTH),
    overlong(110, -1.0, -1.0, -1.0, source=BOTH),
    overlong(90, -0.5, -0.5, -0.5, source=BOTH),
    overlong(80, 0.0, 0.0, 0.0, source=CODE),
    overlong(81, -0.05, -0.05, -0.05, source=CODE),
    overlong(100, -1.0, -1.0, -1.0, source=CODE),
    overlong(101, -1.0, -1.0, -1.0, source=CODE),
]


# ------------------------------------------------------------------------------------------------ checking

def _values(score) -> tuple:
    return score if isinstance(score, tuple) else (score,)


def _same(peer, ours) -> bool:
    """A peer's score equals ours: within the peers' rounding, and a zero with the same sign (-0.0 is not 0.0)."""
    if peer == SKIPS or peer is None or ours is None:
        return peer is ours or (peer == SKIPS and ours is None)
    return abs(peer - ours) <= PEER_TOLERANCE and (peer != 0 or math.copysign(1, peer) == math.copysign(1, ours))


def differences(case: Case) -> list[tuple[str, object, object]]:
    """(peer, its score, ours) for each compared value that differs."""
    found = []
    for name, peer in (("open-r1", case.open_r1), ("TRL", case.trl)):
        if peer is not None:
            peer_values = _values(peer) if peer != SKIPS else (SKIPS,) * len(_values(case.ours))
            found += [(name, p, o) for p, o in zip(peer_values, _values(case.ours)) if not _same(p, o)]
    return found


def summary() -> dict:
    """The table's counts: cases, comparisons (peer score vs ours, per value) and differences by kind."""
    counts = {"cases": len(CASES), "comparisons": 0, "same": 0, "ours is right": 0, "convention": 0}
    for case in CASES:
        for peer in (case.open_r1, case.trl):
            if peer is not None:
                counts["comparisons"] += len(_values(case.ours))
        found = differences(case)
        counts["ours is right" if case.why.startswith("ours is right") else "convention"] += len(found)
    counts["same"] = counts["comparisons"] - counts["ours is right"] - counts["convention"]
    return counts


def _call(reward: str, cases: list[Case]) -> list:
    """Our reward on the cases (one call: math-verify's worker processes take the whole batch at once)."""
    texts = [text for case in cases for text in case.completions]
    names = sorted({name for case in cases for name in case.columns})
    columns = {name: [value for case in cases for value in _values(case.columns[name])] for name in names}
    group = {"group_size": len(cases[0].completions)} if reward == "kimi_length" else {}
    return env.REWARDS[reward](texts, **columns, **cases[0].kwargs, **group)


@pytest.fixture(scope="module")
def our_scores() -> dict:
    """Our score(s) per case index, computed in as few calls as the cases' keyword arguments allow."""
    batches = {}
    for index, case in enumerate(CASES):
        key = (case.reward, repr(sorted(case.kwargs.items())), tuple(sorted(case.columns)), len(case.completions))
        batches.setdefault(key, []).append(index)
    scores = {}
    for (reward, *_), indices in batches.items():
        values = iter(_call(reward, [CASES[i] for i in indices]))
        for i in indices:
            got = tuple(next(values) for _ in CASES[i].completions)
            scores[i] = got if len(got) > 1 else got[0]
    return scores


def _case_id(index: int) -> str:
    return f"{index}-{CASES[index].reward}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=_case_id)
def test_our_score_is_the_tables(index, our_scores):
    """Our reward gives the table's value for the case, a 0.0 with its sign."""
    case, got = CASES[index], our_scores[index]
    for expected, value in zip(_values(case.ours), _values(got), strict=True):
        if expected is None:
            assert value is None
        else:
            assert value == pytest.approx(expected, abs=1e-9)
            assert math.copysign(1, value) == math.copysign(1, expected), "a zero with the wrong sign"


def test_every_difference_has_its_reason():
    """A row gives a reason exactly when a peer's score differs from ours: a fix ("ours is right because …") or a
    convention ("convention: …"); every row compares with at least one peer."""
    for index, case in enumerate(CASES):
        assert case.reward in env.REWARDS and (case.open_r1 is not None or case.trl is not None), index
        if differences(case):
            assert case.why.startswith(("ours is right because", "convention: ")), (index, case.why)
        else:
            assert not case.why, (index, "no peer differs here: drop the reason")


if __name__ == "__main__":
    print(summary())
