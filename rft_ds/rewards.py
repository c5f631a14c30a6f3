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
        raise KeyError(f"the prompts have no {key!r} metadata: give each prompt a dict with the reference answer "
                       f"under {key!r}")
    answers = kwargs[key]
    if len(answers) != n:
        raise ValueError(f"{key!r} metadata has {len(answers)} entries for {n} outputs")
    return answers


def normalize_text(s: str) -> str:
    return " ".join(str(s).strip().lower().split()).rstrip(".")


def exact_match(samples: list[str], prompts: list[str], outputs: list[str], answer_key: str = "answer",
                **kwargs: Any) -> list[float]:
    """1.0 when the output equals the reference answer after trimming, lower-casing and collapsing spaces."""
    answers = _answers(kwargs, len(outputs), answer_key)
    return [float(normalize_text(o) == normalize_text(a)) for o, a in zip(outputs, answers)]


def numeric_match(samples: list[str], prompts: list[str], outputs: list[str], answer_key: str = "answer",
                  rel_tol: float = 1e-6, **kwargs: Any) -> list[float]:
    """1.0 when the last number in the output equals the reference number (how GSM8K-style answers are graded)."""
    answers = _answers(kwargs, len(outputs), answer_key)
    scores = []
    for out, ans in zip(outputs, answers):
        ref = ans if isinstance(ans, (int, float)) else last_number(str(ans))
        got = last_number(out)
        scores.append(float(ref is not None and got is not None and math.isclose(got, float(ref), rel_tol=rel_tol,
                                                                                abs_tol=1e-9)))
    return scores


def accuracy(samples: list[str], prompts: list[str], outputs: list[str], **kwargs: Any) -> dict[str, float]:
    """metric_fn for numeric tasks: the share of exactly right answers and of outputs with any number."""
    scores = numeric_match(samples, prompts, outputs, **kwargs)
    return {"accuracy": sum(scores) / max(len(scores), 1),
            "has_number": sum(last_number(o) is not None for o in outputs) / max(len(outputs), 1)}


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

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 512, label: int | None = None,
                 device: str | None = None, max_length_field: str = "reward.reward_model_max_length") -> None:
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
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": o}],
                                                   tokenize=False) for p, o in zip(prompts, outputs)]

    def _ids(self, prompts: list[str], outputs: list[str]) -> list[list[int]]:
        # verbose=False: a long input is expected here (it is cut below), not worth transformers' warning
        return self.tokenizer(self.texts(prompts, outputs), add_special_tokens=not self.chat, verbose=False)["input_ids"]

    def encode(self, prompts: list[str], outputs: list[str], prompt_ids: Sequence[int] | None = None) -> list[list[int]]:
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
                warnings.warn(f"rft_ds: the reward model {self.path} cut the middle out of {cut} completions to fit "
                              f"{self.max_length_field}={self.max_length} (their prompt and end are kept); counted in "
                              "the metrics as reward_<term>_truncated", stacklevel=2)
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
            row = self._ids([prompt], [text(out[:head]) + text(out[len(out) - (keep - head):])])[0]
            if len(row) <= self.max_length:
                return row
            keep -= len(row) - self.max_length
        from rft_ds.config import ConfigError

        alone = len(self._ids([prompt], [""])[0])
        raise ConfigError(f"{self.max_length_field}={self.max_length} cannot hold prompt {pid} and any of its "
                          f"completion: the prompt alone is {alone} reward-model tokens"
                          f"{' with the chat template' if self.chat else ''}; raise {self.max_length_field}")

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
                idx = order[lo:lo + self.batch_size]
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
        raise ConfigError(f"reward.reward_model {path}: model type {cfg.get('model_type')!r} has no sequence-classification head")
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"reward.reward_model {path} is a {archs[0]}, not a sequence classifier: "
                         "its score head would be random")
    n = int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2)
    if label is None and n != 1:
        raise ConfigError(f"reward.reward_model {path} has {n} labels: set reward.reward_model_label to the one to reward")
    if label is not None and not 0 <= label < n:
        raise ConfigError(f"reward.reward_model_label {label} is out of range for {n} labels")
    return n
