"""Built-in rewards with trlx's signature: reward_fn(samples, prompts, outputs, **metadata) -> list[float].

Name them in a config as `reward.reward_fn: rft_ds.rewards:numeric_match`. The reference answer comes
from each prompt's metadata (`answer` by default), so the prompt data decides what is right.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Sequence

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in `text` ("1,234" and "-5.5" included), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _answers(kwargs: dict, n: int, key: str) -> Sequence[Any]:
    if key not in kwargs:
        raise KeyError(
            f"the prompts have no {key!r} metadata: give each prompt a dict with the reference answer under {key!r}"
        )
    answers = kwargs[key]
    if len(answers) != n:
        raise ValueError(f"{key!r} metadata has {len(answers)} entries for {n} outputs")
    return answers


def normalize_text(s: str) -> str:
    return " ".join(str(s).strip().lower().split()).rstrip(".")


def exact_match(
    samples: list[str], prompts: list[str], outputs: list[str], answer_key: str = "answer", **kwargs: Any
) -> list[float]:
    """1.0 when the output equals the reference answer after trimming, lower-casing and collapsing spaces."""
    answers = _answers(kwargs, len(outputs), answer_key)
    return [float(normalize_text(o) == normalize_text(a)) for o, a in zip(outputs, answers)]


def numeric_match(
    samples: list[str],
    prompts: list[str],
    outputs: list[str],
    answer_key: str = "answer",
    rel_tol: float = 1e-6,
    **kwargs: Any,
) -> list[float]:
    """1.0 when the last number in the output equals the reference number (how GSM8K-style answers are graded)."""
    answers = _answers(kwargs, len(outputs), answer_key)
    scores = []
    for out, ans in zip(outputs, answers):
        ref = ans if isinstance(ans, (int, float)) else last_number(str(ans))
        got = last_number(out)
        scores.append(
            float(ref is not None and got is not None and math.isclose(got, float(ref), rel_tol=rel_tol, abs_tol=1e-9))
        )
    return scores


class Scores(list):
    """A reward function's scores with counts of what went wrong on the way (a verifier's timeouts and
    errors). Return it instead of a list, and name the counts in the function's `reports` attribute: the
    scorer sums them over calls, executors and ranks into reward_<term>_<count>, so a failure is counted,
    never a silent 0. A list, so it passes every check a list passes and pickles across the process
    executor."""

    def __init__(self, scores: Sequence[Any], **counts: int) -> None:
        super().__init__(scores)
        self.counts = counts

    @classmethod
    def from_verdicts(cls, verdicts: Sequence[tuple[str, float]]) -> Scores:
        """The scores of (status, score) pairs, counting the statuses "timeout" and "error" (a verifier's)."""
        return cls(
            [score for _, score in verdicts],
            timeouts=sum(status == "timeout" for status, _ in verdicts),
            errors=sum(status == "error" for status, _ in verdicts),
        )


def math_verify(
    samples: list[str],
    prompts: list[str],
    outputs: list[str],
    answer_key: str = "answer",
    timeout_s: float = 5.0,
    workers: int = 2,
    **kwargs: Any,
) -> Scores:
    """1.0 when the completion's final answer equals the reference mathematically, else 0.0 (HF's math-verify:
    1/2 = 0.5 = \\frac{1}{2}, sets, intervals, equations). The answer is the one the completion marks
    (rft_ds.answers: \\boxed{}, <answer>, ####, "the answer is"); in a completion that marks none,
    math-verify's own pick (its last LaTeX or plain expression: "$\\frac{6}{4}$" is 3/2, not the last number 4).

    Each comparison runs in a verifier worker process (rft_ds.verifier; `workers` per process, started once)
    under a hard limit of `timeout_s` (+ grace): one that hangs is cut off, scored 0.0 and counted as
    reward_<term>_timeouts; one that raises (or a reference that does not parse) as reward_<term>_errors.
    The same in every executor: inline (the default; the workers are its parallelism), thread or process."""
    from rft_ds import verifier
    from rft_ds.answers import final_answer

    answers = _answers(kwargs, len(outputs), answer_key)
    checks = []
    for out, ref in zip(outputs, answers):
        found = final_answer(out, MARKED)
        checks.append([str(ref), found if found is not None else out, found is not None])
    verdicts = verifier.pool(("math_verify",), workers).run("rft_ds.rewards:math_equal", checks, timeout_s)
    return Scores.from_verdicts([(status, 1.0 if status == "ok" and value else 0.0) for status, value in verdicts])


def _check_math_references(
    metadata: Sequence[dict], answer_key: str = "answer", workers: int = 2, timeout_s: float = 5.0, **kwargs: Any
) -> None:
    """Before any model loads: every prompt has a reference, and up to 64 of them, spread over the set, parse
    as math (all of a million would take minutes; one that slips through is counted as an error)."""
    from rft_ds import verifier

    missing = next((i for i, m in enumerate(metadata) if m.get(answer_key) is None), None)
    if missing is not None:
        raise ValueError(f"prompt {missing} has no {answer_key!r} metadata (the reference answer)")
    picked = (
        sorted({round(k * (len(metadata) - 1) / 63) for k in range(64)}) if len(metadata) > 64 else range(len(metadata))
    )
    refs = [str(metadata[i][answer_key]) for i in picked]
    try:
        got = verifier.pool(("math_verify",), workers).run(
            "rft_ds.rewards:parses_as_math", [[r] for r in refs], timeout_s
        )
    except RuntimeError as e:  # a worker that cannot start (math-verify missing, ...)
        raise ValueError(f"the math verifier cannot start: {e}") from None
    for i, ref, (status, value) in zip(picked, refs, got):
        # a timeout says nothing about the reference (a loaded node): only a clear "no" refuses the run
        if (status == "ok" and not value) or status == "error":
            raise ValueError(f"prompt {i}'s reference answer {ref[:60]!r} does not parse as math")


def parses_as_math(reference: str) -> bool:
    """Whether math-verify reads `reference` as math, not only as text (runs in a verifier worker)."""
    from math_verify import parse

    return any(not isinstance(g, str) for g in parse(f"\\boxed{{{reference}}}", parsing_timeout=None))


math_verify.reports = ("timeouts", "errors")
math_verify.check_metadata = _check_math_references
MARKED = ("boxed", "tagged", "hashes", "stated")  # the answers a completion marks as such


def math_equal(reference: str, answer: str, extracted: bool) -> bool:
    """math-verify's verdict on one answer; runs in a verifier worker, whose limits replace math-verify's own
    timeouts (signal-based, so off here). extracted: `answer` is the final answer alone (parsed as if
    boxed), else a whole completion for math-verify to search."""
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None, raise_on_error=True)
    if all(isinstance(g, str) for g in gold):  # math-verify's fallback keeps the raw text: not math
        raise ValueError(f"the reference answer {reference[:60]!r} does not parse as math")
    got = parse(f"\\boxed{{{answer}}}" if extracted else answer, parsing_timeout=None, raise_on_error=True)
    if got and verify(gold, got, timeout_seconds=None, raise_on_error=True):
        return True
    if extracted:  # the marked text may carry words ("the answer is 72 clips"): math-verify's own reading of it
        got = parse(answer, parsing_timeout=None, raise_on_error=True)
        return bool(got) and bool(verify(gold, got, timeout_seconds=None, raise_on_error=True))
    return False


def reasoning_gym(
    samples: list[str],
    prompts: list[str],
    outputs: list[str],
    rg_task: Sequence[str] = (),
    rg_config: Sequence[str] = (),
    rg_entry: Sequence[str] = (),
    timeout_s: float = 5.0,
    workers: int = 2,
    **kwargs: Any,
) -> Scores:
    """The task's own scorer (reasoning-gym's score_answer, partial credit included) on the completion's answer:
    its last <answer>...</answer> (reasoning-gym's convention, which its default system prompt asks for),
    else a \\boxed{}, '####' or 'the answer is' one. Prompts from data.prompts: reasoning_gym:<task>?...
    (rft_ds.tasks.reasoning_gym), which carry the task, its config and the entry. Scored in verifier workers
    (rft_ds.verifier): a scorer that hangs is cut off at timeout_s, scored 0 and counted
    (reward_<term>_timeouts), one that raises too (..._errors)."""
    from rft_ds import verifier
    from rft_ds.answers import final_answer

    checks = [
        [task, config, final_answer(out, RG_ORDER), entry]
        for out, task, config, entry in zip(outputs, rg_task, rg_config, rg_entry)
    ]
    verdicts = verifier.pool(("reasoning_gym",), workers).run("rft_ds.rewards:rg_score", checks, timeout_s)
    return Scores.from_verdicts([(status, float(value) if status == "ok" else 0.0) for status, value in verdicts])


RG_ORDER = ("tagged", "boxed", "hashes", "stated")
_RG_DATASETS: dict[tuple[str, str], Any] = {}


def rg_score(task: str, config: str, answer: str | None, entry: str) -> float:
    """reasoning-gym's score of `answer` on `entry` (runs in a verifier worker; the task's dataset object made
    once per config)."""
    import json

    import reasoning_gym as rg

    if (task, config) not in _RG_DATASETS:
        _RG_DATASETS[(task, config)] = rg.create_dataset(task, **json.loads(config))
    from rft_ds.tasks import load_entry

    score = _RG_DATASETS[(task, config)].score_answer(answer, load_entry(entry))
    return float(score or 0.0)


def _check_reasoning_gym(metadata: Sequence[dict], **kwargs: Any) -> None:
    """Before any model loads: every prompt carries what the task's scorer needs."""
    for i, m in enumerate(metadata):
        if not all(m.get(k) for k in ("rg_task", "rg_config", "rg_entry")):
            raise ValueError(
                f"prompt {i} has no reasoning-gym task metadata (rg_task, rg_config, rg_entry): take the "
                "prompts from 'reasoning_gym:<task>?size=..&seed=..'"
            )


reasoning_gym.reports = ("timeouts", "errors")
reasoning_gym.check_metadata = _check_reasoning_gym


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The program a completion writes: its last fenced code block (```python ... ```), else all of it."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def harness(
    solution: str,
    test: str | None = None,
    entry_point: str | None = None,
    test_list: Sequence[str] | None = None,
    setup: str | None = None,
) -> str:
    """The sandbox's main.py: read the token from stdin, run the solution, then the tests, and print the token
    (with the count of asserts passed, for test_list) only if it gets there: an early sys.exit(0) or a crash
    is a failure. The token is in the same interpreter as the solution, so a program that looks through
    the harness's frames can forge a pass: this catches accidents and shallow hacks, not an adversary.
    HumanEval: `test` defines check(candidate), called on `entry_point`; MBPP: `test_list` of assert lines,
    each counted alone, after `setup` (test_setup_code)."""
    lines = [
        "import sys as _sys",
        "def _rft_ds_main():",
        "    token = _sys.stdin.readline().strip()",
        "    ns = {'__name__': '__main__'}",
        f"    exec(compile({solution!r}, 'solution.py', 'exec'), ns)",
    ]
    if setup:
        lines.append(f"    exec(compile({setup!r}, 'setup.py', 'exec'), ns)")
    if test_list is not None:
        lines += [
            "    passed = 0",
            f"    for t in {list(test_list)!r}:",
            "        try:",
            "            exec(compile(t, 'test.py', 'exec'), ns)",
            "            passed += 1",
            "        except Exception:",
            "            pass",
            "    print(token, passed, flush=True)",
        ]
    else:
        lines += [
            f"    exec(compile({test!r}, 'test.py', 'exec'), ns)",
            f"    ns['check'](ns[{entry_point!r}])",
            "    print(token, 1, flush=True)",
        ]
    return "\n".join(lines + ["_rft_ds_main()", ""])


def code_tests(
    samples: list[str],
    prompts: list[str],
    outputs: list[str],
    score: str = "all",
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    processes: int = 32,
    workers: int = 4,
    **kwargs: Any,
) -> Scores:
    """Run each completion's program against its task's tests in a sandbox (rft_ds.sandbox: its own directory,
    uid and network namespace as root; CPU, memory, file-size and process limits; a wall-clock timeout; every
    process it left killed). Tests from the prompt's metadata: HumanEval's `test` + `entry_point` (the
    completion may be the function's body: the prompt goes first when the program does not define
    entry_point), or MBPP's `test_list` of asserts (+ `test_setup_code`). score: all (1.0 when every test
    passes) or share (the share of test_list's asserts that pass). Runs `workers` sandboxes at a time; a run
    past timeout_s scores 0 and is counted (reward_<term>_timeouts), one the sandbox could not start too
    (..._errors)."""
    import secrets
    from concurrent.futures import ThreadPoolExecutor

    from rft_ds import sandbox

    if score not in ("all", "share"):
        raise ValueError(f"code_tests: score must be all or share, got {score!r}")
    n = len(outputs)
    tests, entries, lists = (kwargs.get(k) or [None] * n for k in ("test", "entry_point", "test_list"))
    setups = kwargs.get("test_setup_code") or [None] * n
    jobs = []
    for i, out in enumerate(outputs):
        if not lists[i] and (tests[i] is None or entries[i] is None):
            raise ValueError(
                f"code_tests: sample {i} (prompt {prompts[i][:40]!r}) has no tests: give its prompt "
                "test + entry_point (HumanEval) or test_list (MBPP) metadata"
            )
        code = extract_code(out)
        if not lists[i] and f"def {entries[i]}" not in code:
            code = prompts[i] + code  # HumanEval: the completion is the body of the prompt's function
        jobs.append((harness(code, tests[i], entries[i], lists[i] or None, setups[i]), len(lists[i] or [1])))
    limits = sandbox.Limits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_mb=memory_mb, processes=processes)

    def one(job: tuple[str, int]) -> tuple[str, float]:
        program, total = job
        token = secrets.token_hex(16)
        try:
            got = sandbox.run(program, limits, stdin=token + "\n")
        except Exception:  # noqa: BLE001 - the sandbox could not run it: counted, not a stopped run
            return "error", 0.0
        passed = 0
        lines = [line.split() for line in got.output.splitlines() if line.startswith(token)]
        if got.status == "passed" and lines:  # the harness's own line: the token, then the asserts passed
            try:
                passed = min(max(int(lines[0][1]), 0), total)
            except (IndexError, ValueError):
                passed = 0
        share = passed / total
        return got.status, (share if score == "share" else float(passed == total))

    with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as ex:
        results = list(ex.map(one, jobs))
    return Scores.from_verdicts(results)


def _check_code_tests(metadata: Sequence[dict], **kwargs: Any) -> None:
    """Before any model loads: every prompt has tests (HumanEval's test + entry_point, or MBPP's test_list)."""
    for i, m in enumerate(metadata):
        if not (m.get("test_list") or (m.get("test") and m.get("entry_point"))):  # an empty test_list: none
            raise ValueError(
                f"prompt {i} has no tests: give it test + entry_point (HumanEval) or test_list (MBPP) metadata"
            )


code_tests.reports = ("timeouts", "errors")
code_tests.check_metadata = _check_code_tests


def accuracy(samples: list[str], prompts: list[str], outputs: list[str], **kwargs: Any) -> dict[str, float]:
    """metric_fn for numeric tasks: the share of exactly right answers and of outputs with any number."""
    scores = numeric_match(samples, prompts, outputs, **kwargs)
    return {
        "accuracy": sum(scores) / max(len(scores), 1),
        "has_number": sum(last_number(o) is not None for o in outputs) / max(len(outputs), 1),
    }


class RewardModel:
    """An HF sequence-classification model as reward_fn. Each rank holds its own copy and scores only its
    own completions (the sharded scorer calls it like any reward_fn): batched, no grad, eval mode.

    The input is the conversation (prompt as user turn, output as assistant turn) through the reward
    model's chat template when it has one, else prompt + output. The score is the logit of a 1-label head,
    or the probability of `label` for a classifier with several labels.

    An input longer than max_length loses the middle of its completion, never the prompt: the model must
    judge an answer with its question, and a long chain of thought ends with its answer. The completion's
    first quarter of what fits and its end are kept (cut on the completion's token ids); such samples are
    counted (`n_truncated`; the scorer reports them as reward_<term>_truncated). A prompt that leaves no
    room for any completion token is an error naming `max_length_field`."""

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        max_length: int = 512,
        label: int | None = None,
        device: str | None = None,
        max_length_field: str = "reward.reward_model_max_length",
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rft_ds import distributed as D

        check_reward_model(path, label)
        device = str(device or D.device())  # this rank's device (the device rule), not LOCAL_RANK as an ordinal
        self.device, self.batch_size, self.max_length, self.label = device, batch_size, max_length, label
        self.path, self.max_length_field = path, max_length_field
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        if self.model.config.pad_token_id is None:  # it finds each row's last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.n_truncated = 0  # samples whose completion lost its middle, since this model was loaded
        self._taken = 0  # n_truncated when take_truncated last ran

    def texts(self, prompts: list[str], outputs: list[str]) -> list[str]:
        if not self.chat:
            return [p + o for p, o in zip(prompts, outputs)]
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": o}], tokenize=False
            )
            for p, o in zip(prompts, outputs)
        ]

    def _ids(self, prompts: list[str], outputs: list[str]) -> list[list[int]]:
        # verbose=False: a long input is expected here (it is cut below), not worth transformers' warning
        return self.tokenizer(self.texts(prompts, outputs), add_special_tokens=not self.chat, verbose=False)[
            "input_ids"
        ]

    def encode(
        self, prompts: list[str], outputs: list[str], prompt_ids: Sequence[int] | None = None
    ) -> list[list[int]]:
        """Each sample's input ids, at most max_length: as tokenized whole when it fits (so a short sample
        scores exactly as it always did), else with the middle of its completion cut out."""
        ids = self._ids(prompts, outputs)
        cut = 0
        for i, row in enumerate(ids):
            if len(row) > self.max_length:
                pid = prompt_ids[i] if prompt_ids is not None else i
                ids[i] = self._cut_middle(prompts[i], outputs[i], len(row), pid)
                cut += 1
        if cut:
            if not self.n_truncated:
                warnings.warn(
                    f"rft_ds: the reward model {self.path} cut the middle out of {cut} completions to fit "
                    f"{self.max_length_field}={self.max_length} (their prompt and end are kept); counted in "
                    "the metrics as reward_<term>_truncated",
                    stacklevel=2,
                )
            self.n_truncated += cut
        return ids

    def _cut_middle(self, prompt: str, output: str, full_len: int, pid: Any) -> list[int]:
        """prompt + output's ids within max_length: the output keeps its first quarter of the tokens that fit
        and the rest from its end. Re-encoded whole, since tokens may merge across the cut or the template;
        each retry keeps fewer tokens, so it ends."""

        def text(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

        out = self.tokenizer(output, add_special_tokens=False, verbose=False)["input_ids"]
        keep = len(out) - (full_len - self.max_length)  # completion tokens that fit beside the prompt
        while keep >= 1:
            head = keep // 4
            row = self._ids([prompt], [text(out[:head]) + text(out[len(out) - (keep - head) :])])[0]
            if len(row) <= self.max_length:
                return row
            keep -= len(row) - self.max_length
        from rft_ds.errors import ConfigError

        alone = len(self._ids([prompt], [""])[0])
        raise ConfigError(
            f"{self.max_length_field}={self.max_length} cannot hold prompt {pid} and any of its "
            f"completion: the prompt alone is {alone} reward-model tokens"
            f"{' with the chat template' if self.chat else ''}; raise {self.max_length_field}"
        )

    def take_truncated(self) -> int:
        """Samples cut since the last call (the scorer reports them once per scoring)."""
        n, self._taken = self.n_truncated - self._taken, self.n_truncated
        return n

    def __call__(self, samples: list[str], prompts: list[str], outputs: list[str], **kwargs: Any) -> list[float]:
        import torch

        ids = self.encode(prompts, outputs, kwargs.get("prompt_ids"))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
        scores = [0.0] * len(ids)
        with torch.inference_mode():
            for lo in range(0, len(order), self.batch_size):
                idx = order[lo : lo + self.batch_size]
                enc = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits.float()
                vals = logits[:, 0] if self.label is None else logits.softmax(-1)[:, self.label]
                for i, v in zip(idx, vals.tolist()):
                    scores[i] = v
        return scores


def check_reward_model(path: str, label: int | None = None) -> int:
    """From config.json alone, before any weights load: a sequence classifier, with a usable head. Returns
    its number of labels."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from rft_ds.config import ConfigError, read_model_config

    cfg = read_model_config(path, "reward.reward_model")
    if cfg.get("model_type") not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ConfigError(
            f"reward.reward_model {path}: model type {cfg.get('model_type')!r} has no sequence-classification head"
        )
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(
            f"reward.reward_model {path} is a {archs[0]}, not a sequence classifier: its score head would be random"
        )
    n = int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2)
    if label is None and n != 1:
        raise ConfigError(
            f"reward.reward_model {path} has {n} labels: set reward.reward_model_label to the one to reward"
        )
    if label is not None and not 0 <= label < n:
        raise ConfigError(f"reward.reward_model_label {label} is out of range for {n} labels")
    return n
