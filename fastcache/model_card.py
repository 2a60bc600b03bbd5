"""The model card of a model trained with a fastcache loss: sentence-transformers' class name and link, and a note.

sentence-transformers' card template links a loss to its documentation on sbert.net only when the loss's class
lives in ``sentence_transformers.*``; any other class gets its bare dotted path. A fastcache loss is a drop-in
subclass of the upstream class of the same name, so its card line names that upstream class with upstream's link
and, on the next line, says which fastcache class computed it:

    * Loss: [<code>GISTEmbedLoss</code>](https://sbert.net/docs/package_reference/sentence_transformer/losses.html#gistembedloss) with these parameters:
      ```json
      {...}
      ```
    * Computed by: fastcache 0.1.0 (<code>fastcache.losses.gist_embed.GISTEmbedLoss</code>)

The note also appears when a fastcache loss is wrapped by an upstream one (e.g. sentence-transformers'
MatryoshkaLoss around fastcache's MultipleNegativesRankingLoss). The config, tags and citations are upstream's
(the subclasses inherit ``get_config_dict`` and ``citation``; the class names are the same).

:func:`install` wraps ``BaseModelCardData.compute_dataset_metrics`` (the one place that turns a dataset's loss
into the card's ``loss`` entry) once; the loss packages call it when imported. Losses that are not fastcache's
are left exactly as upstream describes them.
"""

from __future__ import annotations

import functools

from sentence_transformers.base.model_card import BaseModelCardData, get_losses
from sentence_transformers.util import fullname

_WRAPPED = "_fastcache_model_card"


def is_fastcache_loss(loss) -> bool:
    """Whether ``loss``'s class is, or derives from, a class defined in fastcache."""
    return any(cls.__module__.startswith("fastcache.") for cls in type(loss).__mro__)


def upstream_class(loss) -> type | None:
    """The sentence-transformers class that a fastcache loss stands in for (the first one in its MRO); None when
    ``loss``'s own class is not defined in fastcache (upstream's classes and the user's own subclasses)."""
    if not type(loss).__module__.startswith("fastcache."):
        return None
    return next((cls for cls in type(loss).__mro__ if cls.__module__.startswith("sentence_transformers.")), None)


def fastcache_note(loss) -> str | None:
    """The card line naming the fastcache classes among ``loss`` and the losses it wraps; None if there are none."""
    from fastcache import __version__

    names = list(dict.fromkeys(fullname(inner) for inner in get_losses(loss) if is_fastcache_loss(inner)))
    if not names:
        return None
    return f"* Computed by: fastcache {__version__} (" + ", ".join(f"<code>{name}</code>" for name in names) + ")"


def describe_loss(dataset_info: dict, loss) -> dict:
    """Rewrite the card's ``loss`` entry of ``dataset_info`` (built by sentence-transformers) for a fastcache loss:
    upstream's class as the name (so the template links it), the note after the config block."""
    entry = dataset_info.get("loss") if isinstance(dataset_info, dict) else None
    if not isinstance(entry, dict) or loss is None or isinstance(loss, dict):
        return dataset_info
    upstream = upstream_class(loss)
    if upstream is not None:
        entry["fullname"] = fullname(upstream)
    note = fastcache_note(loss)
    if note is not None and "config_code" in entry:  # the template prints config_code last on the loss's line
        entry["config_code"] = f"{entry['config_code']}\n{note}"
    return dataset_info


def install() -> None:
    """Make sentence-transformers' model cards describe fastcache losses as in the module docstring. Idempotent."""
    original = BaseModelCardData.compute_dataset_metrics
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def compute_dataset_metrics(self, dataset, dataset_info, loss):
        return describe_loss(original(self, dataset, dataset_info, loss), loss)

    setattr(compute_dataset_metrics, _WRAPPED, True)
    BaseModelCardData.compute_dataset_metrics = compute_dataset_metrics
