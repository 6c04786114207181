import pytest
from llm_embedder.tasks import (
    TASKS,
    Task,
    check_names,
    get_task,
    register_task,
    unregister_task,
)

# The released BAAI/llm-embedder checkpoint was trained with exactly these strings.
REFERENCE_INSTRUCTIONS = {
    "qa": ("Represent this query for retrieving relevant documents: ",
           "Represent this document for retrieval: "),
    "chat": ("Embed this dialogue to find useful historical dialogues: ",
             "Embed this historical dialogue for retrieval: "),
    "icl": ("Convert this example into vector to look for useful examples: ",
            "Convert this example into vector for retrieval: "),
    "tool": ("Transform this user request for fetching helpful tool descriptions: ",
             "Transform this tool description for retrieval: "),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_INSTRUCTIONS))
def test_instructions_match_the_released_checkpoint(name):
    task = get_task(name)
    assert (task.instruction("query"), task.instruction("key")) == REFERENCE_INSTRUCTIONS[name]


def test_qa_prompt_follows_the_reference_template():
    prompt = TASKS["qa"].format_prompt("Who won?", "Denver won.")
    assert prompt == "Knowledge: Denver won.\n\nQuestion: Who won?\n\nAnswer:"


def test_empty_context_prompt_has_no_knowledge_section():
    assert "Knowledge" not in TASKS["qa"].format_prompt("Who won?", "")
    assert TASKS["chat"].format_prompt("hi", None) == "Speaker 1: hi\nSpeaker 2:"


def test_memory_tasks_have_no_shared_corpus_and_use_kl():
    assert not TASKS["chat"].shared_corpus and TASKS["chat"].loss == "kl"
    assert TASKS["qa"].shared_corpus and TASKS["qa"].loss == "graded"


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="known tasks"):
        get_task("nope")


def test_unknown_side_is_rejected():
    with pytest.raises(ValueError, match="side"):
        TASKS["qa"].instruction("document")


def test_register_custom_task_and_refuse_silent_overwrite():
    task = Task("faq-test", "Q: ", "A: ", "{key}\n{query}", "{query}")
    try:
        register_task(task)
        assert get_task("faq-test") is task
        with pytest.raises(ValueError, match="already registered"):
            register_task(task)
        register_task(task, overwrite=True)
    finally:
        TASKS.pop("faq-test", None)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_template="{query}"), "must contain '{key}'"),
    (dict(empty_template="nothing"), "empty_template must contain"),
    (dict(loss="mse"), "loss must be"),
    (dict(primary_metric="ndcg@3"), "primary_metric must be one of"),
    (dict(primary_metric="accuracy"), "primary_metric must be one of"),  # no downstream
    (dict(downstream="summary"), "downstream must be one of"),
    (dict(downstream_k=0), "downstream_k must be >= 1"),
    (dict(prompt_template="{key} {title} {query}"), "has the placeholder {title}"),
    (dict(empty_template="{query} {"), "empty_template is not a valid template"),
])
def test_register_rejects_broken_tasks(kwargs, match):
    fields = dict(name="broken-test", query_instruction="q", key_instruction="k",
                  prompt_template="{key} {query}", empty_template="{query}")
    fields.update(kwargs)
    with pytest.raises(ValueError, match=match):
        register_task(Task(**fields))
    assert "broken-test" not in TASKS


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_built_in_task_names_a_registered_loss_and_a_reported_metric(name):
    check_names(TASKS[name])


def test_unregister_removes_a_task_and_names_an_unknown_one():
    register_task(Task("gone-test", "q", "k", "{key} {query}", "{query}"))
    assert unregister_task("gone-test").name == "gone-test" and "gone-test" not in TASKS
    with pytest.raises(ValueError, match="known tasks"):
        unregister_task("gone-test")
