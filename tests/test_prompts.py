import copy

import pytest

from recursivemas.errors import ConfigError, InputError
from recursivemas.models.tiny import tiny_tokenizer
from recursivemas.prompts import PLAIN_RESPONSE_CUE, PromptTemplate, SlotRef, render_prompt, validate_question

TEMPLATE = PromptTemplate(
    system="sys",
    user="[[Notes: {context}\n]]Q: {question}[[\nPlan: {slot:planner}]][[\nFeedback: {slot:feedback}]]\nGo.",
)


def test_slots_and_blocks():
    assert TEMPLATE.slots == ("planner", "feedback")
    parts = TEMPLATE.render_user("2+2?", None, {"planner"})
    assert parts == ["Q: 2+2?\nPlan: ", SlotRef("planner"), "\nGo."]
    parts = TEMPLATE.render_user("2+2?", "secret", {"planner", "feedback"})
    assert parts[0] == "Notes: secret\nQ: 2+2?\nPlan: " and parts[-2:] == [SlotRef("feedback"), "\nGo."]


def test_question_text_is_never_reinterpreted():
    parts = TEMPLATE.render_user("what is {slot:planner} and {context}?", None, set())
    assert parts == ["Q: what is {slot:planner} and {context}?\nGo."]


def test_unknown_slot_names_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown slot 'critic' for agent 'solver'.*planner, feedback"):
        TEMPLATE.check_slot("critic", "solver")


def test_template_needs_question_and_unique_slots():
    with pytest.raises(ConfigError, match="question"):
        PromptTemplate(system="", user="no field")
    with pytest.raises(ConfigError, match="twice"):
        PromptTemplate(system="", user="{question}{slot:a}{slot:a}")


def test_chat_template_rendering_keeps_slot_position():
    tok = tiny_tokenizer("bytelevel")
    segments = render_prompt(tok, TEMPLATE, "2+2?", None, {"planner"})
    assert segments[0].startswith("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nQ: 2+2?\nPlan: ")
    assert segments[1] == SlotRef("planner")
    assert segments[2] == "\nGo.<|im_end|>\n<|im_start|>assistant\n"


def test_plain_fallback_without_chat_template():
    tok = tiny_tokenizer("metaspace")
    segments = render_prompt(tok, TEMPLATE, "2+2?", None, set())
    assert segments == [f"<bos>sys\n\nQ: 2+2?\nGo.\n\n{PLAIN_RESPONSE_CUE}"]


@pytest.mark.parametrize("bad", ["", "   \n\t", None, 3, "a\ue000b"])
def test_bad_questions(bad):
    with pytest.raises(InputError):
        validate_question(bad)


def test_blocks_can_differ_by_round():
    template = PromptTemplate(
        system="sys",
        user="Q: {question}[[round=1: Make a first plan.]][[round>1: Improve it given {slot:feedback}.]]",
    )
    assert template.render_user("2+2?", None, set(), round_=1) == ["Q: 2+2?Make a first plan."]
    later = template.render_user("2+2?", None, {"feedback"}, round_=3)
    assert later == ["Q: 2+2?Improve it given ", SlotRef("feedback"), "."]
    assert template.render_user("2+2?", None, set(), round_=2) == ["Q: 2+2?"]  # no feedback yet


def test_templates_that_take_enable_thinking_get_the_releases_false_unless_the_agent_says():
    tok = copy.deepcopy(tiny_tokenizer("bytelevel"))
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    )
    assert render_prompt(tok, TEMPLATE, "2+2?", None, set())[-1].endswith("<assistant><think></think>")
    thinking = render_prompt(tok, TEMPLATE, "2+2?", None, set(), {"enable_thinking": True})
    assert thinking[-1].endswith("<assistant>")
