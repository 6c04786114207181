"""Task registry: everything about one retrieval need of an LLM, in one place.

A :class:`Task` carries its instructions, the LLM prompt template, the loss it trains with, the
sampling budget and stop rule for LLM feedback, its primary evaluation metric and how the
frozen LLM uses retrieved items downstream. ``register_task(Task(...))`` alone makes a new task
labelable (``label``), trainable (``train``) and evaluable (``evaluate``).

The instruction strings are those of the released ``BAAI/llm-embedder`` checkpoint (each ends
with one space), so that checkpoint works unchanged with this package.
"""

from __future__ import annotations

import dataclasses
import os
import string
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Union

LossName = str  # a name in llm_embedder.losses.LOSSES: "graded", "kl", "contrastive", ...
Side = Literal["query", "key"]
#: How the frozen LLM uses a task's top-k retrieved items in downstream evaluation:
#: ``answer``: log-likelihood / perplexity (and exact match) of the desired answer with them as
#: context; ``perplexity``: the same without exact match (memory: the answer is a free reply);
#: ``choice``: accuracy of picking the right option with them as demonstrations; ``None``: no
#: downstream metric (retrieval metrics only).
Downstream = Optional[Literal["answer", "perplexity", "choice"]]
DOWNSTREAM_KINDS = ("answer", "perplexity", "choice")


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
    # keys of other queries are then no real negatives (docs/method.md, Losses).
    shared_corpus: bool = True
    # Separator put between the prompt and the desired output when scoring.
    answer_prefix: str = " "
    # LLM feedback: new tokens per sample at most (answers are short: spans, labels, one API
    # call), and whether a sample may span lines (otherwise it stops at the first newline).
    max_new_tokens: int = 32
    multiline: bool = False
    # Evaluation: the metric the task is judged by, and the downstream LLM use of its top-k.
    primary_metric: str = "ndcg@10"
    downstream: Downstream = None
    downstream_k: int = 3

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


def register_task(task: Task, *, overwrite: bool = False, _check_names: bool = True) -> Task:
    """Add a task (e.g. your own corpus with its own instructions) to the registry; ``label``,
    ``train``, ``evaluate`` and the CLI then know it by name.

    Example:
        >>> register_task(Task("faq", "Query: ", "Passage: ", "{key}\\n{query}", "{query}",
        ...                    loss="contrastive", primary_metric="mrr@10"))
    """
    if task.name in TASKS and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered; pass overwrite=True")
    validate_task(task, check_registries=_check_names)
    TASKS[task.name] = task
    return task


def validate_task(task: Task, *, check_registries: bool = True) -> None:
    """Raise a ValueError naming the field unless ``task`` can be labelled, trained and
    evaluated: a name, templates holding ``{query}`` (and ``{key}``) and no other placeholder,
    a known downstream kind, budgets >= 1 and (``check_registries``) a registered loss and a
    metric evaluation reports (:func:`check_names`). Registers nothing.

    Example:
        >>> validate_task(Task("faq", "Q: ", "P: ", "{key}\\n{query}", "{query}"))
    """
    if not task.name:
        raise ValueError("task name must be a non-empty string")
    for field, template in (("prompt_template", task.prompt_template),
                            ("empty_template", task.empty_template)):
        if "{query}" not in template:
            raise ValueError(f"task {task.name!r}: {field} must contain '{{query}}'")
        _check_placeholders(task.name, field, template)
    if "{key}" not in task.prompt_template:
        raise ValueError(f"task {task.name!r}: prompt_template must contain '{{key}}'")
    if task.downstream is not None and task.downstream not in DOWNSTREAM_KINDS:
        raise ValueError(f"task {task.name!r}: downstream must be one of {DOWNSTREAM_KINDS} or "
                         f"None, got {task.downstream!r}")
    if task.max_new_tokens < 1 or task.downstream_k < 1:
        raise ValueError(f"task {task.name!r}: max_new_tokens and downstream_k must be >= 1")
    if check_registries:
        check_names(task)


def _check_placeholders(name: str, field: str, template: str) -> None:
    """Only ``{query}`` and ``{key}``: any other placeholder would fail at the first prompt,
    deep inside labelling or evaluation, instead of here."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone "{" or "}"
        raise ValueError(f"task {name!r}: {field} is not a valid template ({exc}); write a "
                         f"literal brace as '{{{{' or '}}}}'") from None
    for _, placeholder, _, _ in parsed:
        if placeholder is not None and placeholder not in ("query", "key"):
            raise ValueError(f"task {name!r}: {field} has the placeholder {{{placeholder}}}; "
                             f"only {{query}} and {{key}} are filled (write a literal brace as "
                             f"'{{{{' or '}}}}')")


def check_names(task: Task) -> None:
    """Raise a ValueError unless ``task.loss`` is a registered loss and ``task.primary_metric``
    one that evaluation reports for a task of its downstream kind.

    Example:
        >>> check_names(TASKS["qa"])
    """
    # Imported here: losses imports torch, and evaluate imports this module.
    from .evaluate import metrics_of
    from .losses import LOSSES

    if task.loss not in LOSSES:
        raise ValueError(f"task {task.name!r}: loss must be one of {sorted(LOSSES)}, "
                         f"got {task.loss!r}")
    metrics = metrics_of(task)
    if task.primary_metric not in metrics:
        raise ValueError(f"task {task.name!r}: primary_metric must be one of {list(metrics)} "
                         f"(downstream={task.downstream!r}), got {task.primary_metric!r}")


def unregister_task(name: str) -> Task:
    """Remove a registered task (e.g. a test's or a notebook's own); returns it.

    Example:
        >>> unregister_task("faq")
    """
    get_task(name)  # a ValueError listing the known tasks
    return TASKS.pop(name)


def get_task(name: str) -> Task:
    """The registered task called ``name``; a ValueError lists the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


# ----------------------------------------------------------------------------- tasks files

PathLike = Union[str, "os.PathLike[str]"]
#: Fields a task in a tasks file must give unless it names a ``base`` task to start from.
_REQUIRED = ("query_instruction", "key_instruction", "prompt_template", "empty_template")


def load_tasks_file(path: PathLike) -> List[Task]:
    """The tasks declared in a YAML or JSON file, validated but not registered.

    The file holds one key, ``tasks``: a mapping from each new task's name to its
    :class:`Task` fields. ``query_instruction``, ``key_instruction``, ``prompt_template`` and
    ``empty_template`` are required unless ``base`` names a registered task (or one earlier in
    the file) whose fields the task starts from; every other field has the Task default. Quote
    instructions in YAML: an unquoted value loses its trailing space. Any error is a
    :class:`~llm_embedder.config.ConfigError` naming the file and the key
    (``tasks.<name>.<field>``).

    Example:
        >>> # tasks.yaml:
        >>> # tasks:
        >>> #   faq:
        >>> #     base: qa
        >>> #     query_instruction: "Find the FAQ entry answering: "
        >>> #     loss: contrastive
        >>> [task.name for task in load_tasks_file("tasks.yaml")]
        ['faq']
    """
    from .config import ConfigError, read_config_file

    path = Path(path)
    values = read_config_file(path)  # FileNotFoundError / ConfigError naming the file
    unknown = sorted(set(values) - {"tasks"})
    if unknown or "tasks" not in values:
        raise ConfigError(f"{path}: a tasks file holds one key, 'tasks' (a mapping of task "
                          f"names to their fields)" + (f"; unknown key(s) {unknown}"
                                                        if unknown else ""))
    declared = values["tasks"]
    if not isinstance(declared, Mapping) or not declared:
        raise ConfigError(f"{path}: 'tasks' must be a non-empty mapping of task names to their "
                          f"fields, got {type(declared).__name__}")
    tasks: Dict[str, Task] = {}
    for name, fields in declared.items():
        try:
            tasks[str(name)] = _task_from_fields(str(name), fields, tasks)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return list(tasks.values())


def _task_from_fields(name: str, fields: Any, earlier: Mapping[str, Task]) -> Task:
    """One ``tasks.<name>`` entry as a validated Task; ValueErrors name the key."""
    from .config import _expected, _matches

    key = f"tasks.{name}"
    if not name.strip():
        raise ValueError(f"{key}: a task name must be a non-empty string")
    if not isinstance(fields, Mapping):
        raise ValueError(f"{key}: expected a mapping of Task fields, got "
                         f"{type(fields).__name__}")
    hints = typing.get_type_hints(Task)
    allowed = [f.name for f in dataclasses.fields(Task) if f.name != "name"]
    unknown = sorted(set(fields) - set(allowed) - {"base"})
    if unknown:
        raise ValueError(f"{key}: unknown field(s) {unknown}; known: {['base'] + allowed}")
    values: Dict[str, Any] = {}
    if "base" in fields:
        base = fields["base"]
        known = {**TASKS, **earlier}
        if not isinstance(base, str) or base not in known:
            raise ValueError(f"{key}.base: {base!r} is not a registered task (nor one earlier "
                             f"in the file); known: {sorted(known)}")
        values = {f: getattr(known[base], f) for f in allowed}
    for field in allowed:
        if field in fields:
            value = fields[field]
            if not _matches(value, hints[field]):
                raise ValueError(f"{key}.{field}: expected {_expected(hints[field])}, got "
                                 f"{type(value).__name__} {value!r}")
            values[field] = value
    missing = [f for f in _REQUIRED if f not in values]
    if missing:
        raise ValueError(f"{key}: missing field(s) {missing} (or name a task to start from "
                         f"with 'base')")
    task = Task(name=name, **values)
    try:
        validate_task(task)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    return task


def register_tasks_file(path: PathLike) -> List[Task]:
    """Register every task of a tasks file (see :func:`load_tasks_file`); all or none: a task
    whose name is already registered is an error naming the file and the key, and nothing is
    registered then. Returns the tasks (give them to :func:`unregister_task` to undo).

    Example:
        >>> [task.name for task in register_tasks_file("tasks.yaml")]
        ['faq']
    """
    from .config import ConfigError

    tasks = load_tasks_file(path)
    for task in tasks:
        if task.name in TASKS:
            raise ConfigError(f"{os.fspath(path)}: tasks.{task.name}: a task {task.name!r} is "
                              f"already registered; give yours another name (start from it "
                              f"with 'base: {task.name}')")
    for task in tasks:
        TASKS[task.name] = task
    return tasks


_QA_PROMPT = "Knowledge: {key}\n\nQuestion: {query}\n\nAnswer:"
_QA_EMPTY = "Question: {query}\n\nAnswer:"

# Primary metrics of the bundled tasks. qa: nDCG@10, not R@5 — on the bundled 190-passage corpus
# R@5 is 0.93-0.99 for every system (BM25 and MiniLM alike), so it cannot tell systems apart,
# while nDCG@10 still rewards putting the one gold paragraph first. icl has no positives: the
# LLM's accuracy is the only thing that measures retrieved examples.
for _task in (
    Task("qa", "Represent this query for retrieving relevant documents: ",
         "Represent this document for retrieval: ", _QA_PROMPT, _QA_EMPTY, "graded",
         max_new_tokens=24, primary_metric="ndcg@10", downstream="answer", downstream_k=3),
    Task("convsearch", "Encode this query and context for searching relevant passages: ",
         "Encode this passage for retrieval: ", _QA_PROMPT, _QA_EMPTY, "graded",
         max_new_tokens=24, downstream="answer", downstream_k=3),
    Task("chat", "Embed this dialogue to find useful historical dialogues: ",
         "Embed this historical dialogue for retrieval: ",
         "{key}\nSpeaker 1: {query}\nSpeaker 2:", "Speaker 1: {query}\nSpeaker 2:", "kl",
         shared_corpus=False, max_new_tokens=32, primary_metric="recall@5",
         downstream="perplexity", downstream_k=3),
    Task("lrlm", "Embed this text chunk for finding useful historical chunks: ",
         "Embed this historical text chunk for retrieval: ", "{key}\n{query}", "{query}", "kl",
         shared_corpus=False, answer_prefix="", max_new_tokens=64, multiline=True,
         downstream="perplexity", downstream_k=3),
    # The reference recipe uses top-8 demos; 4 keep the prompts within a CPU budget.
    Task("icl", "Convert this example into vector to look for useful examples: ",
         "Convert this example into vector for retrieval: ", "{key}\n{query}", "{query}",
         "graded", max_new_tokens=8, primary_metric="accuracy", downstream="choice",
         downstream_k=4),
    # The reference has no LLM reward for tools; we still score the API call as the output.
    Task("tool", "Transform this user request for fetching helpful tool descriptions: ",
         "Transform this tool description for retrieval: ",
         "API documentation: {key}\n\nRequest: {query}\n\nAPI call:",
         "Request: {query}\n\nAPI call:", "graded", max_new_tokens=48,
         primary_metric="ndcg@5"),
):
    register_task(_task, _check_names=False)  # test_tasks checks their loss and metric
