"""Prompt templates and the force-answer suffix (METHOD.md §2, §8)."""

from __future__ import annotations

# METHOD.md §8 (review answer to fdAZ). `{max_clause}` is empty for training and evaluation and
# " Use at most 30 segments." for the §3.2 depth analysis.
EPISODE_INSTRUCTION = (
    "Break down your reasoning into logically coherent segments. Each segment should be enclosed in "
    "<episode_k> ... </episode_k> tags, where k is the segment number starting from 1.{max_clause} "
    "Ensure each <episode_i> contains only a single complete logical move, such as a definition, a "
    "formula derivation, a transformation, or a case split. Reason inside <think> ... </think>, then "
    "give the final answer in \\boxed{{}}."
)

# METHOD.md §2: "close the think block, then 'Please output the final answer directly based on the
# above steps:'".
FORCE_ANSWER_INSTRUCTION = "Please output the final answer directly based on the above steps: "
FORCE_ANSWER_SUFFIX = "\n</think>\n\n" + FORCE_ANSWER_INSTRUCTION

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def episode_instruction(max_episodes: int | None = None) -> str:
    """The §8 instruction; with ``max_episodes`` it adds the §3.2 'at most N segments' clause."""
    clause = f" Use at most {max_episodes} segments." if max_episodes else ""
    return EPISODE_INSTRUCTION.format(max_clause=clause)


def build_prompt(problem: str, max_episodes: int | None = None) -> str:
    """A plain-text prompt: the problem and the §8 instruction. No think block is opened here: the
    model opens it, or its chat template's generation prompt does (:func:`encode_prompt`)."""
    if not problem or not problem.strip():
        raise ValueError("build_prompt: the problem text is empty; every prompt needs a problem statement.")
    return f"{problem.strip()}\n\n{episode_instruction(max_episodes)}\n"


def render_answer(answer: str) -> str:
    """The reference answer in the answer format, a = ``\\boxed{answer}`` (METHOD.md §2)."""
    if answer is None or not str(answer).strip():
        raise ValueError(
            "render_answer: the reference answer is empty; J(s) needs a non-empty reference answer."
        )
    return "\\boxed{" + str(answer).strip() + "}"


def render_prompt(tokenizer, text: str) -> str:
    """The prompt as text: a user turn plus the generation prompt through the tokenizer's chat
    template when it has one (as chat-tuned reasoning models expect), else ``text`` itself."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return text


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt: :func:`render_prompt` tokenised without adding special tokens (a
    chat template writes its own), which is how transformers tokenises a template it renders."""
    return tokenizer(render_prompt(tokenizer, text), add_special_tokens=False)["input_ids"]
