"""The family registry, complete: importing this module imports every built-in family
module (each registers its :class:`~textenc.text_encoders.registry.Family`), so ask the
registry through here.

Adding a family is one module that defines its classes and registers its entry, plus
its import below.

>>> [family.name for family in families()][:3]
['sd1', 'sd2', 'sdxl']
>>> get_family("sdxl").role_names
('l', 'g')
>>> get_family("sd3").role_names, get_family("flux").role_names, get_family("wan").role_names
(('l', 'g', 't5xxl'), ('l', 't5xxl'), ('umt5xxl',))
"""

from __future__ import annotations

# Each built-in family module registers its entry at import, in this order.
from . import sd1_clip, sd2_clip, sdxl_clip, sd3_clip, flux, wan  # noqa: F401
from .registry import (Family, Role, families, family_for_encoders, family_names, get_family,
                       register_family, unregister_family)

__all__ = ["Family", "Role", "families", "family_for_encoders", "family_names", "get_family",
           "register_family", "unregister_family", "CLIP_TYPES", "ROLES"]

#: The built-in families' names (``clip_type``), as before the registry.
CLIP_TYPES = family_names()
#: The roles of each built-in family, in the order they are built.
ROLES = {family.name: family.role_names for family in families()}
