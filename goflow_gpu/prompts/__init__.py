"""Prompt specs, the catalog that holds them, and QA of the model's answers.

Public surface::

    load_catalog(directory=None) -> Catalog      # None = the shipped catalog
    Catalog.spec_for(slug, name) -> PromptSpec   # unknown slug -> generic fallback spec
    Catalog.render(spec) -> RenderedPrompt       # exact texts + schema, frozen per job
    lint_catalog(directory) -> (errors, warnings)
    qa.check_output(text, rendered, rules, original_size=..., model_size=...) -> QAVerdict
    qa.retry_user_prompt(user_prompt, reasons) -> str
    geometry.smart_resize(height, width, ...)
    geometry.to_wire_box(corners, ...) / geometry.to_model_corners(box, ...)  # boxes both ways

How to write a spec: PROMPTS.md at the top of the repository.
"""

from goflow_gpu.prompts.catalog import (
    Catalog,
    CatalogError,
    fallback_spec,
    lint_catalog,
    load_catalog,
    shipped_catalog_dir,
)
from goflow_gpu.prompts.spec import (
    CatalogSettings,
    PromptSpec,
    QARules,
    RenderedPrompt,
    Sampling,
    Variant,
)

__all__ = [
    "Catalog",
    "CatalogError",
    "CatalogSettings",
    "PromptSpec",
    "QARules",
    "RenderedPrompt",
    "Sampling",
    "Variant",
    "fallback_spec",
    "lint_catalog",
    "load_catalog",
    "shipped_catalog_dir",
]
