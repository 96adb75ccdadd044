"""The textenc sub-commands (``encode``, ``inspect``, ``vision``) and what every
command line shares (:mod:`textenc.commands.common`); :mod:`textenc.cli` assembles them."""
