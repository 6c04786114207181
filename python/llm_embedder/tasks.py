"""Task registry: instructions, LLM prompt templates and the loss each task trains with.

The instruction strings are those of the released ``BAAI/llm-embedder`` checkpoint (each ends
with one space), so that checkpoint works unchanged with this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal

LossName = Literal["graded", "kl", "contrastive"]
Side = Literal["query", "key"]


@dataclass(frozen=True)
class Task:
    """One retrieval need of an LLM.

    ``prompt_template`` is the context the frozen LLM sees before the desired output; it holds
    ``{key}`` (the retrieved candidate) and ``{query}``. ``empty_template`` is the same prompt
    without retrieval (the empty-context candidate). The desired output is appended after the
    prompt, so only its tokens are scored.

    Example:
        >>> TASKS["qa"].format_prompt("Who won?", "Denver won.")
        'Knowledge: Denver won.\\n\\nQuestion: Who won?\\n\\nAnswer:'
    """

    name: str
    query_instruction: str
    key_instruction: str
    prompt_template: str
    empty_template: str
    loss: LossName = "graded"
    # False for tasks whose candidates live in the query's own conversation/document: in-batch
    # keys of other queries are then no real negatives (DESIGN.md §4, KL distillation).
    shared_corpus: bool = True
    # Separator put between the prompt and the desired output when scoring.
    answer_prefix: str = " "

    def instruction(self, side: Side) -> str:
        if side == "query":
            return self.query_instruction
        if side == "key":
            return self.key_instruction
        raise ValueError(f"side must be 'query' or 'key', got {side!r}")

    def format_prompt(self, query: str, key: str | None) -> str:
        """The LLM prompt for ``query`` with ``key`` as context (``None`` or ``""``: no context)."""
        if not key:
            return self.empty_template.format(query=query)
        return self.prompt_template.format(query=query, key=key)


TASKS: Dict[str, Task] = {}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Add a task (e.g. your own corpus with its own instructions) to the registry.

    Example:
        >>> register_task(Task("faq", "Query: ", "Passage: ", "{key}\\n{query}", "{query}"))
    """
    if not task.name:
        raise ValueError("task name must be a non-empty string")
    if task.name in TASKS and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered; pass overwrite=True")
    for field, template in (("prompt_template", task.prompt_template),
                            ("empty_template", task.empty_template)):
        if "{query}" not in template:
            raise ValueError(f"task {task.name!r}: {field} must contain '{{query}}'")
    if "{key}" not in task.prompt_template:
        raise ValueError(f"task {task.name!r}: prompt_template must contain '{{key}}'")
    if task.loss not in ("graded", "kl", "contrastive"):
        raise ValueError(f"task {task.name!r}: loss must be graded, kl or contrastive")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``; a ValueError lists the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


_QA_PROMPT = "Knowledge: {key}\n\nQuestion: {query}\n\nAnswer:"
_QA_EMPTY = "Question: {query}\n\nAnswer:"

for _task in (
    Task("qa", "Represent this query for retrieving relevant documents: ",
         "Represent this document for retrieval: ", _QA_PROMPT, _QA_EMPTY, "graded"),
    Task("convsearch", "Encode this query and context for searching relevant passages: ",
         "Encode this passage for retrieval: ", _QA_PROMPT, _QA_EMPTY, "graded"),
    Task("chat", "Embed this dialogue to find useful historical dialogues: ",
         "Embed this historical dialogue for retrieval: ",
         "{key}\nSpeaker 1: {query}\nSpeaker 2:", "Speaker 1: {query}\nSpeaker 2:", "kl",
         shared_corpus=False),
    Task("lrlm", "Embed this text chunk for finding useful historical chunks: ",
         "Embed this historical text chunk for retrieval: ", "{key}\n{query}", "{query}", "kl",
         shared_corpus=False, answer_prefix=""),
    Task("icl", "Convert this example into vector to look for useful examples: ",
         "Convert this example into vector for retrieval: ", "{key}\n{query}", "{query}",
         "graded"),
    # The reference has no LLM reward for tools; we still score the API call as the output.
    Task("tool", "Transform this user request for fetching helpful tool descriptions: ",
         "Transform this tool description for retrieval: ",
         "API documentation: {key}\n\nRequest: {query}\n\nAPI call:",
         "Request: {query}\n\nAPI call:", "graded"),
):
    register_task(_task)
