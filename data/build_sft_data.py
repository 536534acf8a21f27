"""Build the bundled SFT and DPO sample sets: generated, verifiable tasks in English and Chinese.

    python -m data.build_sft_data [--out_dir=data] [--seed=0] [--tasks=all|TIER|TASK,...]

Writes ``OUT/sample_sft/{train,heldout}.jsonl``, ``OUT/sample_dpo/{train,heldout}.jsonl`` and a
``PROVENANCE.md`` in each. Every question has one short, exactly checkable answer, so a tiny model
trained on a CPU can be scored by :func:`exact_match`. The tasks form a ladder in four tiers, by
what a model must do to answer them:

=============  ============================================  ===================================
task           example (en / zh)                             rejected reply in DPO pairs
=============  ============================================  ===================================
*lookup*: read one digit of the question (digits are single tokens; a 2M-parameter model
learns these in minutes)
parity         Is 4821 even or odd? / 4821 是奇数还是偶数？      the other parity
first_digit    What is the first digit of 4821? / ...最高位...   another digit of the number
last_digit     What is the last digit of 4821? / ...个位数是几？  another digit of the number
*spell*: the same for letters, which the tokenizer merges ('gr', 'th'): the model must know
how its tokens are spelt
first_letter   What is the first letter of 'plsgq'? / ...      another letter of the word
last_letter    What is the last letter of 'plsgq'? / ...       another letter of the word
*copy*: copy a number from the question, changed a little
next           What number comes after 57? / 57 的下一个数是几？   n - 1 or n + 2
larger         Which is larger, 31 or 87? / 31 和 87 哪个大？      the smaller one
convert        Convert 3 km to meters. / 3 千米等于多少米？         wrong factor or wrong unit
*compute*: digit-by-digit arithmetic or a whole-word transform
add            What is 123 + 45? / 计算 123 + 45。                one digit off (+-1, +-10, +-100)
sub            What is 123 - 45? / 123 减 45 等于多少？            one digit off
reverse        Reverse the string 'abc'. / 把字符串“abc”倒过来写。  two letters swapped, or unreversed
upper          Convert 'abc' to uppercase. / 把“abc”转换成大写字母。 only the first letter upper-cased
count          How many times does 'a' appear in 'banana'? / ... the count +- 1
=============  ============================================  ===================================

``--tasks`` picks tiers or tasks (``--tasks=lookup``, ``--tasks=lookup,next``); the bundled files
hold all of them. Every split holds its default number of records (SFT 5000 train / 400 held-out,
DPO 2000 / 200) unless the chosen tasks have too few distinct instances for that many: the
instances are split evenly over the tasks and never repeat, so ``--tasks=convert`` alone (6 unit
pairs x 999 amounts = 5,994 instances for 7,600 records) scales every split down by the same
factor to fill at most 90% of the smallest task's instance space, with a warning
(:func:`split_sizes`). The default selection is far from that limit. ``make demo`` trains on the
lowest rungs (``--tasks=lookup,first_letter``), what its 15-minute CPU budget can teach a
2M-parameter model. Measured held-out exact match: lookup tasks 0.7-1.0 after 400 SFT steps,
0.97-1.0 after 800; first_letter 0.2-0.35, then 0.79-0.85; with the copy tier mixed in, the same
run learned even the lookup tasks only partly, and the copy and compute tasks stayed near 0.

Each task has several phrasings per language. Held-out sets are disjoint from every training set
by *instance* (the operands), not only by wording, so a held-out question is never seen in
training in another template. Training SFT records mix the three supported formats (messages,
ShareGPT ``conversations``, ``instruction``/``output``) and include some two-round conversations;
held-out records are single-turn ``messages`` with ``task``, ``lang`` and ``answer`` fields for
evaluation. Deterministic for a given seed and task list.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
from pathlib import Path
from typing import Any

from utils.errors import DataError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger("build_sft_data")

SFT_TRAIN, SFT_HELDOUT, DPO_TRAIN, DPO_HELDOUT = 5000, 400, 2000, 200
LANGS = ("en", "zh")
CONCISE_SYSTEM = {"en": "Reply with the answer only.", "zh": "只回答结果。"}

Instance = tuple  # hashable operands of one task instance, e.g. ("add", 123, 45)


def exact_match(prediction: str, answer: str) -> bool:
    """True when ``prediction`` equals ``answer`` up to whitespace (case and punctuation count).

    Leading/trailing whitespace is stripped and inner runs collapse to one space, so
    ``" 168\\n"`` matches ``"168"``.
    """
    return " ".join(prediction.split()) == " ".join(answer.split())


# --- tasks: instance -> (question templates, answer, wrong answer) -------------------------------

UNITS = [  # (en from, en to, zh from, zh to, factor)
    ("km", "meters", "千米", "米", 1000),
    ("m", "centimeters", "米", "厘米", 100),
    ("kg", "grams", "千克", "克", 1000),
    ("hours", "minutes", "小时", "分钟", 60),
    ("minutes", "seconds", "分钟", "秒", 60),
    ("liters", "milliliters", "升", "毫升", 1000),
]

TEMPLATES: dict[str, dict[str, list[str]]] = {
    "parity": {
        "en": ["Is {a} even or odd?", "Is {a} an odd or an even number?"],
        "zh": ["{a} 是奇数还是偶数？", "{a} 是偶数还是奇数？"],
    },
    "first_digit": {
        "en": ["What is the first digit of {a}?", "Which digit does {a} start with?"],
        "zh": ["{a} 的第一位数字是几？", "{a} 的最高位数字是几？"],
    },
    "last_digit": {
        "en": ["What is the last digit of {a}?", "Which digit does {a} end with?"],
        "zh": ["{a} 的最后一位数字是几？", "{a} 的个位数是几？"],
    },
    "first_letter": {
        "en": ["What is the first letter of '{w}'?", "Which letter does '{w}' start with?"],
        "zh": ["“{w}”的第一个字母是什么？", "“{w}”以哪个字母开头？"],
    },
    "last_letter": {
        "en": ["What is the last letter of '{w}'?", "Which letter does '{w}' end with?"],
        "zh": ["“{w}”的最后一个字母是什么？", "“{w}”以哪个字母结尾？"],
    },
    "add": {
        "en": ["What is {a} + {b}?", "Compute {a} plus {b}.", "{a} + {b} = ?", "Add {a} and {b}."],
        "zh": [
            "{a} 加 {b} 等于多少？",
            "计算 {a} + {b}。",
            "请算出 {a} 与 {b} 的和。",
            "{a} + {b} = ？",
        ],
    },
    "sub": {
        "en": [
            "What is {a} - {b}?",
            "Compute {a} minus {b}.",
            "{a} - {b} = ?",
            "Subtract {b} from {a}.",
        ],
        "zh": [
            "{a} 减 {b} 等于多少？",
            "计算 {a} - {b}。",
            "请算出 {a} 与 {b} 的差。",
            "{a} - {b} = ？",
        ],
    },
    "next": {
        "en": [
            "What number comes after {a}?",
            "What is the next integer after {a}?",
            "Count one up from {a}.",
        ],
        "zh": ["{a} 的下一个数是几？", "比 {a} 大 1 的数是多少？", "从 {a} 往后数一个是几？"],
    },
    "larger": {
        "en": [
            "Which is larger, {a} or {b}?",
            "Which number is bigger: {a} or {b}?",
            "Pick the larger of {a} and {b}.",
        ],
        "zh": [
            "{a} 和 {b} 哪个大？",
            "{a} 与 {b} 中较大的数是哪个？",
            "请选出 {a} 和 {b} 中更大的数。",
        ],
    },
    "convert": {
        "en": [
            "Convert {a} {u1} to {u2}.",
            "How many {u2} are in {a} {u1}?",
            "{a} {u1} is how many {u2}?",
        ],
        "zh": ["{a} {u1}等于多少{u2}？", "把 {a} {u1}换算成{u2}。", "{a} {u1}是多少{u2}？"],
    },
    "reverse": {
        "en": [
            "Reverse the string '{w}'.",
            "Write '{w}' backwards.",
            "What is '{w}' spelled in reverse?",
        ],
        "zh": ["把字符串“{w}”倒过来写。", "将“{w}”反转。", "“{w}”倒序是什么？"],
    },
    "upper": {
        "en": [
            "Convert '{w}' to uppercase.",
            "Write '{w}' in capital letters.",
            "Uppercase this word: {w}",
        ],
        "zh": ["把“{w}”转换成大写字母。", "将“{w}”全部大写。", "“{w}”的大写形式是什么？"],
    },
    "count": {
        "en": [
            "How many times does the letter '{c}' appear in '{w}'?",
            "Count the letter '{c}' in '{w}'.",
        ],
        "zh": ["“{w}”中字母“{c}”出现了几次？", "数一数“{w}”里有几个“{c}”。"],
    },
}
TASKS = list(TEMPLATES)
TIERS = {
    "lookup": ["parity", "first_digit", "last_digit"],
    "spell": ["first_letter", "last_letter"],
    "copy": ["next", "larger", "convert"],
    "compute": ["add", "sub", "reverse", "upper", "count"],
}
assert sorted(sum(TIERS.values(), [])) == sorted(TASKS)
PARITY = {"en": ("even", "odd"), "zh": ("偶数", "奇数")}


def select_tasks(spec: str) -> list[str]:
    """``"all"``, or comma-separated tier and task names -> task names in :data:`TASKS` order."""
    picked: set[str] = set()
    for name in filter(None, (part.strip() for part in spec.split(","))):
        if name == "all":
            picked.update(TASKS)
        elif name in TIERS:
            picked.update(TIERS[name])
        elif name in TEMPLATES:
            picked.add(name)
        else:
            raise DataError(
                f"--tasks: unknown task or tier {name!r}; expected 'all', a tier "
                f"({', '.join(TIERS)}) or a task ({', '.join(TASKS)})"
            )
    if not picked:
        raise DataError("--tasks: no task given")
    return [t for t in TASKS if t in picked]


def _word(rng: random.Random, low: int = 3, high: int = 6) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def _digit_off(rng: random.Random, n: int) -> int:
    """A plausible wrong result: n with one digit changed by one (never n itself, never < 0)."""
    steps = [s for s in (1, -1, 10, -10, 100, -100) if n + s >= 0 and abs(s) <= max(1, n)]
    return n + rng.choice(steps)


# Distinct instances sample_instance can draw per task; for the word tasks a lower bound (the
# 3-letter words alone). split_sizes keeps every task's share below MAX_FILL of its space, so
# rejection sampling in _unique_instances always finds new instances quickly.
_WORDS_LOWER_BOUND = 26**3
INSTANCE_SPACE = {
    "parity": 99_990, "first_digit": 99_990, "last_digit": 99_990,  # 10..99999
    "first_letter": _WORDS_LOWER_BOUND, "last_letter": _WORDS_LOWER_BOUND,
    "next": 10_000,  # 0..9999
    "larger": 999 * 998 // 2,  # unordered distinct pairs of 1..999
    "convert": len(UNITS) * 999,  # unit pair x 1..999
    "add": 990 * 991 // 2, "sub": 990 * 991 // 2,  # unordered pairs of 10..999, a == b allowed
    "reverse": _WORDS_LOWER_BOUND, "upper": _WORDS_LOWER_BOUND, "count": _WORDS_LOWER_BOUND,
}
assert sorted(INSTANCE_SPACE) == sorted(TASKS)
MAX_FILL = 0.9


def split_sizes(tasks: list[str]) -> dict[str, int]:
    """Records per split: the defaults, or all of them scaled down by one factor (with a warning)
    when the round-robin share of a task would exceed ``MAX_FILL`` of its instance space."""
    sizes = {
        "sft_heldout": SFT_HELDOUT, "dpo_heldout": DPO_HELDOUT,
        "sft_train": SFT_TRAIN, "dpo_train": DPO_TRAIN,
    }
    share = math.ceil(sum(sizes.values()) / len(tasks))
    smallest = min(tasks, key=INSTANCE_SPACE.__getitem__)
    room = int(MAX_FILL * INSTANCE_SPACE[smallest])
    if share <= room:
        return sizes
    scaled = {split: n * room // share for split, n in sizes.items()}
    logger.warning(
        "--tasks=%s: task %r has only %d distinct instances, too few for %d records per task; "
        "writing %s instead of %s",
        ",".join(tasks), smallest, INSTANCE_SPACE[smallest], share, scaled, sizes,
    )
    return scaled


def sample_instance(rng: random.Random, task: str) -> Instance:
    # Operands are stored sorted, so "a + b" and "b + a" are one instance (the order is picked
    # when rendering) and cannot leak a held-out answer into training.
    if task in ("parity", "first_digit", "last_digit"):
        return (task, rng.randint(10, 99999))
    if task in ("first_letter", "last_letter"):
        return (task, _word(rng))
    if task in ("add", "sub"):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return (task, max(a, b), min(a, b))
    if task == "next":
        return (task, rng.randint(0, 9999))
    if task == "larger":
        a, b = rng.sample(range(1, 1000), 2)
        return (task, max(a, b), min(a, b))
    if task == "convert":
        return (task, rng.randrange(len(UNITS)), rng.randint(1, 999))
    w = _word(rng)
    if task == "count":
        w = w + rng.choice(w) + _word(rng, 0, 3)  # at least one letter repeated sometimes
        return (task, w, rng.choice(w))
    return (task, w)


def render(rng: random.Random, inst: Instance, lang: str) -> tuple[str, str, str]:
    """``(question, answer, wrong answer)`` of an instance in a random phrasing of ``lang``."""
    task = inst[0]
    template = rng.choice(TEMPLATES[task][lang])
    if task == "parity":
        a = inst[1]
        return template.format(a=a), PARITY[lang][a % 2], PARITY[lang][1 - a % 2]
    if task in ("first_digit", "last_digit"):
        digits = str(inst[1])
        k = 0 if task == "first_digit" else -1
        others = [d for d in digits if d != digits[k]] or [str((int(digits[k]) + 1) % 10)]
        return template.format(a=inst[1]), digits[k], rng.choice(others)
    if task in ("first_letter", "last_letter"):
        w = inst[1]
        k = 0 if task == "first_letter" else -1
        others = [c for c in w if c != w[k]] or ["b" if w[k] == "a" else "a"]
        return template.format(w=w), w[k], rng.choice(others)
    if task in ("add", "sub"):
        _, a, b = inst
        if task == "add" and rng.random() < 0.5:
            a, b = b, a
        n = a + b if task == "add" else a - b
        return template.format(a=a, b=b), str(n), str(_digit_off(rng, n))
    if task == "next":
        a = inst[1]
        return template.format(a=a), str(a + 1), str(rng.choice([a - 1, a + 2]) if a > 0 else a + 2)
    if task == "larger":
        _, a, b = inst
        if rng.random() < 0.5:
            a, b = b, a
        return template.format(a=a, b=b), str(max(a, b)), str(min(a, b))
    if task == "convert":
        _, unit, a = inst
        en1, en2, zh1, zh2, factor = UNITS[unit]
        u1, u2 = (en1, en2) if lang == "en" else (zh1, zh2)
        fmt = "{n} {u}" if lang == "en" else "{n}{u}"
        answer = fmt.format(n=a * factor, u=u2)
        wrong_factor = fmt.format(n=a * (factor // 10 if factor != 60 else 100), u=u2)
        wrong_unit = fmt.format(n=a * factor, u=u1)
        return template.format(a=a, u1=u1, u2=u2), answer, rng.choice([wrong_factor, wrong_unit])
    if task == "count":
        _, w, c = inst
        n = w.count(c)
        return (
            template.format(w=w, c=c),
            str(n),
            str(n + 1 if n <= 1 or rng.random() < 0.5 else n - 1),
        )
    w = inst[1]
    if task == "reverse":
        answer = w[::-1]
        i = rng.randrange(len(answer) - 1)
        swapped = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
        wrong = swapped if swapped != answer else w + w[0]
        return template.format(w=w), answer, wrong if wrong != answer else answer + "a"
    answer = w.upper()
    return template.format(w=w), answer, w[0].upper() + w[1:]


# --- records -----------------------------------------------------------------------------------


def _sft_record(
    rng: random.Random, rounds: list[tuple[str, str]], meta: dict[str, Any], lang: str
) -> dict:
    """One training conversation in a randomly chosen format (messages / ShareGPT / instruction)."""
    system = CONCISE_SYSTEM[lang] if rng.random() < 0.1 else None
    fmt = rng.choices(["messages", "sharegpt", "instruction"], weights=[70, 15, 15])[0]
    if fmt == "instruction" and len(rounds) == 1:
        q, a = rounds[0]
        record = {"instruction": q, "input": "", "output": a}
        return {**record, **({"system": system} if system else {}), **meta}
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in rounds:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if fmt == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {
            "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages],
            **meta,
        }
    return {"messages": messages, **meta}


def _unique_instances(
    rng: random.Random, count: int, taken: set, tasks: list[str]
) -> list[Instance]:
    """``count`` new instances, round-robin over ``tasks``, none of them in ``taken`` (updated).

    DataError when a task runs out of new instances (so a too-small operand range cannot make
    this loop forever).
    """
    out = []
    misses = 0
    while len(out) < count:
        inst = sample_instance(rng, tasks[len(out) % len(tasks)])
        if inst not in taken:
            taken.add(inst)
            out.append(inst)
            misses = 0
        elif (misses := misses + 1) > 10_000:
            raise DataError(f"task {inst[0]!r} has run out of distinct instances")
    return out


def build(seed: int = 0, tasks: list[str] | None = None) -> dict[str, list[dict]]:
    """All four splits as lists of records: ``sft_train``, ``sft_heldout``, ``dpo_train``,
    ``dpo_heldout``; over ``tasks`` (default: every task), sized by :func:`split_sizes`."""
    tasks = tasks or TASKS
    sizes = split_sizes(tasks)
    rng = random.Random(seed)
    taken: set = set()
    sft_heldout = _unique_instances(rng, sizes["sft_heldout"], taken, tasks)
    dpo_heldout = _unique_instances(rng, sizes["dpo_heldout"], taken, tasks)
    train = _unique_instances(rng, sizes["sft_train"] + sizes["dpo_train"], taken, tasks)
    sft_train, dpo_train = train[: sizes["sft_train"]], train[sizes["sft_train"] :]

    out: dict[str, list[dict]] = {
        "sft_train": [],
        "sft_heldout": [],
        "dpo_train": [],
        "dpo_heldout": [],
    }
    for i, inst in enumerate(sft_train):
        lg = rng.choice(LANGS)
        rounds = [render(rng, inst, lg)[:2]]
        if i % 10 == 9:  # a two-round conversation: an earlier training question first
            rounds.insert(0, render(rng, rng.choice(sft_train[:i]), lg)[:2])
        out["sft_train"].append(_sft_record(rng, rounds, {"task": inst[0], "lang": lg}, lg))
    for inst in sft_heldout:
        lg = rng.choice(LANGS)
        q, a, _ = render(rng, inst, lg)
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out["sft_heldout"].append({"messages": messages, "task": inst[0], "lang": lg, "answer": a})
    for split, instances in (("dpo_train", dpo_train), ("dpo_heldout", dpo_heldout)):
        for inst in instances:
            lg = rng.choice(LANGS)
            q, a, wrong = render(rng, inst, lg)
            assert a != wrong, (inst, a)
            prompt: str | list = q
            if split == "dpo_train" and rng.random() < 0.2:
                prompt = [{"role": "user", "content": q}]
            out[split].append(
                {"prompt": prompt, "chosen": a, "rejected": wrong, "task": inst[0], "lang": lg}
            )
    return out


PROVENANCE = """# Provenance of {name}

Generated by `{command}` (zero2all's own generator; no external
source). Deterministic for a given seed: re-running it reproduces `train.jsonl` and
`heldout.jsonl` byte for byte.

- `train.jsonl`: {train} records; `heldout.jsonl`: {heldout} records.
- Tasks (round-robin, English and Chinese, several phrasings each): {tasks}.
- Held-out instances (operands) are disjoint from every training instance of both the SFT and
  the DPO sets, so held-out exact match / reward accuracy measure generalisation.
{extra}"""


def write(out_dir: Path, seed: int, tasks: list[str] | None = None) -> None:
    tasks = tasks or TASKS
    splits = build(seed, tasks)
    sft_extra = (
        "- Training records mix the `messages`, ShareGPT `conversations` and `instruction`/`output`\n"
        "  formats; every 10th is a two-round conversation; ~10% carry a short system prompt.\n"
        "  Held-out records are single-turn `messages` plus `task`, `lang`, `answer`.\n"
        "- `mmlu_cot.jsonl` (when present): real instruction data, see PROVENANCE_mmlu_cot.md.\n"
    )
    dpo_extra = (
        "- `chosen` is the correct answer, `rejected` a plausible wrong one (a digit off, the\n"
        "  smaller number, a wrong unit or factor, swapped letters...).\n"
    )
    for name, kind, extra in (("sample_sft", "sft", sft_extra), ("sample_dpo", "dpo", dpo_extra)):
        d = out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        for split in ("train", "heldout"):
            records = splits[f"{kind}_{split}"]
            with open(d / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (d / "PROVENANCE.md").write_text(
            PROVENANCE.format(
                name=f"{out_dir.name}/{name}",
                seed=seed,
                train=len(splits[f"{kind}_train"]),
                heldout=len(splits[f"{kind}_heldout"]),
                tasks=", ".join(tasks),
                command=f"python -m data.build_sft_data --seed={seed}"
                + ("" if tasks == TASKS else f" --tasks={','.join(tasks)}"),
                extra=extra,
            ),
            encoding="utf-8",
        )
        logger.info(
            "wrote %s (%s)",
            d,
            ", ".join(f"{s}: {len(splits[f'{kind}_{s}'])}" for s in ("train", "heldout")),
        )


MMLU_COT_GLOB = "lm_eval/tasks/mmlu/flan_cot_fewshot/mmlu_*.yaml"
MMLU_PROVENANCE = """# Provenance of data/sample_sft/mmlu_cot.jsonl

Real instruction data: the {n} chain-of-thought few-shot exemplars of MMLU ({subjects} subjects,
"flan_cot_fewshot" task configs) shipped inside the `{wheel}` wheel of EleutherAI's
lm-evaluation-harness (https://github.com/EleutherAI/lm-evaluation-harness), MIT license
(Copyright (c) 2020 EleutherAI). Per lm-eval's MMLU README the Flan variants are derived from
https://github.com/jasonwei20/flan-2 as described in Appendix D.1 of Chung et al. 2022
(https://arxiv.org/abs/2210.11416); the MMLU questions are from Hendrycks et al. 2021
(https://arxiv.org/abs/2009.03300, https://github.com/hendrycks/test, MIT license).

Extracted with `pip download --no-deps lm_eval -d /tmp/x` then
`python -m data.build_sft_data --lm_eval_wheel=/tmp/x/{wheel}`: each exemplar's `question`
becomes the user message and its `target` ("Let's think step by step. ... The answer is (X).")
the assistant reply; `subject` names the MMLU subject. Text is kept as shipped (a few exemplars
carry LaTeX escape artefacts of the original YAML). Training data only: no held-out split.
"""


def mmlu_cot_records(wheel: Path) -> list[dict]:
    """MMLU chain-of-thought exemplars from an lm_eval wheel, as ``messages`` records."""
    import fnmatch
    import zipfile

    import yaml

    records = []
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, MMLU_COT_GLOB))
            for name in names:
                config = yaml.safe_load(zf.read(name))
                subject = config["dataset_name"]
                for ex in config["fewshot_config"]["samples"]:
                    messages = [
                        {"role": "user", "content": ex["question"].strip()},
                        {"role": "assistant", "content": ex["target"].strip()},
                    ]
                    records.append(
                        {
                            "messages": messages,
                            "subject": subject,
                            "source": "lm_eval/mmlu_flan_cot",
                        }
                    )
    except (OSError, zipfile.BadZipFile, yaml.YAMLError, KeyError, TypeError) as e:
        raise DataError(
            f"{wheel}: cannot read MMLU CoT exemplars from the lm_eval wheel: {e!r}"
        ) from e
    if not records:
        raise DataError(f"{wheel}: no files matching {MMLU_COT_GLOB}; is it an lm_eval wheel?")
    return records


def write_mmlu_cot(out_dir: Path, wheel: Path) -> None:
    records = mmlu_cot_records(wheel)
    d = out_dir / "sample_sft"
    with open(d / "mmlu_cot.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    subjects = len({r["subject"] for r in records})
    (d / "PROVENANCE_mmlu_cot.md").write_text(
        MMLU_PROVENANCE.format(n=len(records), subjects=subjects, wheel=wheel.name),
        encoding="utf-8",
    )
    logger.info(
        "wrote %s (%d exemplars, %d subjects)", d / "mmlu_cot.jsonl", len(records), subjects
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate data/sample_sft and data/sample_dpo.")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lm_eval_wheel",
        default=None,
        help="also extract MMLU chain-of-thought exemplars from this lm_eval wheel into "
        "sample_sft/mmlu_cot.jsonl (without it, an existing mmlu_cot.jsonl is left alone)",
    )
    parser.add_argument(
        "--tasks",
        default="all",
        help=f"comma-separated tiers ({', '.join(TIERS)}) and/or task names "
        f"({', '.join(TASKS)}); default: all. A selection with too few distinct instances "
        "for the default record counts (convert alone) writes fewer records, with a warning",
    )
    args = parser.parse_args(argv)
    setup_logging()
    write(Path(args.out_dir), args.seed, select_tasks(args.tasks))
    if args.lm_eval_wheel:
        write_mmlu_cot(Path(args.out_dir), Path(args.lm_eval_wheel))


if __name__ == "__main__":
    run_cli(main)
