"""Pure model code: init-free ``ops``, one attention entry point, CLIP layers and models, configs.

Nothing here knows prompts, files or families; everything takes device, dtype and
``operations`` as arguments."""
