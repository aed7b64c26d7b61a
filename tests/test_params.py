"""Parameter validation: every field checked, every problem named."""

from __future__ import annotations

from typing import Any

import pytest

from stepcast import settings as settings_module
from stepcast.errors import InvalidParams
from stepcast.models import Catalog, ModelCard
from stepcast.params import MAX_FIELD_ERRORS, parse_body

SETTINGS = settings_module.load(default_size_px=64)
CATALOG = Catalog.of({}, SETTINGS)  # the default model alone, before any worker announced it
LONE = "must be valid Unicode: \\ud800 is half of a surrogate pair"


def fields_of(body: Any) -> dict[str, str]:
    with pytest.raises(InvalidParams) as info:
        parse_body(body, SETTINGS, CATALOG)
    return {e.field: e.message for e in info.value.errors}


def test_defaults_are_filled_and_seed_is_always_chosen() -> None:
    params = parse_body({"prompt": "a red fox"}, SETTINGS, CATALOG).params
    assert (params.steps, params.width, params.height, params.num_images) == (20, 64, 64, 1)
    assert params.model == "tiny" and params.scheduler is None
    assert 0 <= params.seed < 2**32
    assert params.image_seeds() == [params.seed]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({}, "prompt", "prompt is required"),
        ({"prompt": ""}, "prompt", "prompt must not be empty"),
        ({"prompt": "   "}, "prompt", "prompt must not be empty"),
        ({"prompt": 7}, "prompt", "prompt must be a string"),
        ({"prompt": "x" * 2001}, "prompt", "prompt must be at most 2000 characters"),
        ({"prompt": "a\x00b"}, "prompt", "prompt must not contain NUL characters"),
        ({"prompt": "p", "negative_prompt": ["x"]}, "negative_prompt", "negative_prompt must be a string"),
        ({"prompt": "p", "model": "sdxl"}, "model", "model must be one of: tiny"),
        ({"prompt": "p", "steps": 0}, "steps", "steps must be between 1 and 150"),
        ({"prompt": "p", "steps": 151}, "steps", "steps must be between 1 and 150"),
        ({"prompt": "p", "steps": 2.5}, "steps", "steps must be an integer"),
        ({"prompt": "p", "steps": "20"}, "steps", "steps must be an integer"),
        ({"prompt": "p", "steps": True}, "steps", "steps must be an integer"),
        ({"prompt": "p", "width": 65}, "width", "width must be a multiple of 8"),
        ({"prompt": "p", "width": 32}, "width", "width must be between 64 and 1024"),
        ({"prompt": "p", "height": 2048}, "height", "height must be between 64 and 1024"),
        ({"prompt": "p", "guidance_scale": -1}, "guidance_scale", "guidance_scale must be between 0 and 50"),
        ({"prompt": "p", "guidance_scale": "high"}, "guidance_scale", "guidance_scale must be a number"),
        ({"prompt": "p", "seed": -1}, "seed", f"seed must be between 0 and {2**53 - 1}"),
        ({"prompt": "p", "seed": 2**60}, "seed", f"seed must be between 0 and {2**53 - 1}"),
        ({"prompt": "p", "num_images": 5}, "num_images", "num_images must be between 1 and 4"),
        (
            {"prompt": "p", "scheduler": "magic"},
            "scheduler",
            "scheduler must be one of: euler, euler_a, ddim, dpmpp_2m, unipc",
        ),
        *[  # not a name at all (a list or an object cannot even be looked up): the same answer
            (
                {"prompt": "p", "scheduler": odd},
                "scheduler",
                "scheduler must be one of: euler, euler_a, ddim, dpmpp_2m, unipc",
            )
            for odd in (["euler"], {"name": "euler"}, 7)
        ],
        ({"prompt": "p", "model": ["tiny"]}, "model", "model must be one of: tiny"),
        ({"prompt": "p", "step": 20}, "step", "unknown field 'step'"),
        (
            {"prompt": "p", "preview": {"every": 0}},
            "preview.every",
            "preview.every must be between 1 and 150",
        ),
        (
            {"prompt": "p", "preview": {"max_px": 512}},
            "preview.max_px",
            "preview.max_px must be between 16 and 256",
        ),
        ({"prompt": "p", "preview": {"size": 1}}, "preview.size", "unknown field 'preview.size'"),
        ({"prompt": "p", "preview": "yes"}, "preview", "preview must be an object"),
        ([1, 2], "body", "request body must be a JSON object"),
        # What JSON's \\u escapes spell and Postgres cannot store, wherever it is.
        ({"prompt": "a\ud800b"}, "prompt", f"prompt {LONE}"),
        (
            {"prompt": "p", "negative_prompt": "\udfff"},
            "negative_prompt",
            f"negative_prompt {LONE.replace('d800', 'dfff')}",
        ),
        ({"prompt": "p", "st\ud800eps": 1}, "st\\ud800eps", f"the field name st\\ud800eps {LONE}"),
        (
            {"prompt": "p", "preview": {"\x00": 1}},
            "preview.\\x00",
            "the field name preview.\\x00 must not contain NUL characters",
        ),
        (
            {"prompt": "p", "webhook": {"url": "https://a.example/\ud800"}},
            "webhook.url",
            f"webhook.url {LONE}",
        ),
        (
            {"prompt": "p", "webhook": {"url": "https://a.example/\x00"}},
            "webhook.url",
            "webhook.url must not contain NUL characters",
        ),
        (
            {"prompt": "p", "webhook": {"url": "https://a.example/a b"}},
            "webhook.url",
            "url must not contain spaces or control characters",
        ),
        (
            {"prompt": "p", "webhook": {"url": "https://a.example/\r\n"}},
            "webhook.url",
            "url must not contain spaces or control characters",
        ),
        (
            {"prompt": "p", "webhook": {"url": "https://a.example/", "events": ["\ud800"]}},
            "webhook.events[0]",
            f"webhook.events[0] {LONE}",
        ),
    ],
)
def test_each_bad_field_is_named(body: Any, field: str, message: str) -> None:
    assert fields_of(body) == {field: message}


def test_a_body_of_bad_strings_is_answered_with_the_first_few() -> None:
    assert len(fields_of({"prompt": "p", "negative_prompt": ["\x00"] * 1000})) == MAX_FIELD_ERRORS


def test_every_problem_is_reported_at_once() -> None:
    problems = fields_of({"steps": 0, "width": 7, "colour": "red", "preview": {"every": 0}})
    assert set(problems) == {"prompt", "steps", "width", "colour", "preview.every"}


def test_preview_defaults() -> None:
    submission = parse_body({"prompt": "p", "preview": {}}, SETTINGS, CATALOG)
    assert submission.preview is not None
    assert (submission.preview.every, submission.preview.max_px) == (1, 128)
    assert parse_body({"prompt": "p"}, SETTINGS, CATALOG).preview is None


def card(name: str, family: str, **changes: Any) -> ModelCard:
    values: dict[str, Any] = {
        "name": name,
        "revision": "r1",
        "family": family,
        "device": "cuda",
        "dtype": "float16",
        "schedulers": ("euler", "ddim"),
        "min_size_px": 512,
        "max_size_px": 2048,
        "default_size_px": 1024,
        "max_steps": 100,
        "default_steps": 30,
        "batch_size": 2,
        "previews": "latent",
    }
    return ModelCard(**{**values, **changes})


def test_each_model_has_its_own_defaults_and_limits_within_the_servers() -> None:
    catalog = Catalog.of(
        {"sdxl": card("sdxl", "sdxl"), "flux": card("flux", "flux", schedulers=())}, SETTINGS
    )
    sdxl = parse_body({"prompt": "p", "model": "sdxl"}, SETTINGS, catalog).params
    # Its own default size and steps; the server's caps (max_size_px 1024) hold over its 2048.
    assert (sdxl.width, sdxl.height, sdxl.steps, sdxl.model) == (1024, 1024, 30, "sdxl")
    tiny = parse_body({"prompt": "p"}, SETTINGS, catalog).params  # the default model's, as before
    assert (tiny.width, tiny.steps, tiny.model) == (64, 20, "tiny")
    with pytest.raises(InvalidParams) as info:
        parse_body(
            {"prompt": "p", "model": "sdxl", "width": 256, "steps": 120, "scheduler": "unipc"},
            SETTINGS,
            catalog,
        )
    assert {e.field: e.message for e in info.value.errors} == {
        "width": "width must be between 512 and 1024",
        "steps": "steps must be between 1 and 100",
        "scheduler": "scheduler must be one of: euler, ddim",
    }
    with pytest.raises(InvalidParams) as info:
        parse_body({"prompt": "p", "model": "flux", "scheduler": "euler"}, SETTINGS, catalog)
    assert info.value.errors[0].message == "model flux runs its own scheduler: leave scheduler out"


def test_a_model_the_server_is_told_of_is_taken_with_its_limits_before_any_worker_announces() -> None:
    told = settings_module.load(default_size_px=64, models=("sdxl",))
    params = parse_body({"prompt": "p", "model": "sdxl"}, told, Catalog.of({}, told)).params
    assert (params.model, params.width, params.steps) == ("sdxl", 64, 20)  # the server's, until then


def test_a_model_whose_sizes_miss_the_servers_is_refused_saying_so() -> None:
    catalog = Catalog.of({"huge": card("huge", "sdxl", min_size_px=2048, max_size_px=4096)}, SETTINGS)
    with pytest.raises(InvalidParams) as info:
        parse_body({"prompt": "p", "model": "huge"}, SETTINGS, catalog)
    assert [(e.field, e.message) for e in info.value.errors] == [
        ("model", "model huge makes 2048-4096 px images, and this server takes 64-1024 px: ask its operator")
    ]


def test_an_unknown_model_is_refused_naming_the_models_there_are() -> None:
    catalog = Catalog.of({"sdxl": card("sdxl", "sdxl")}, SETTINGS)
    with pytest.raises(InvalidParams) as info:
        parse_body({"prompt": "p", "model": "sd15"}, SETTINGS, catalog)
    assert [(e.field, e.message) for e in info.value.errors] == [
        ("model", "model must be one of: sdxl, tiny")
    ]
