"""Reading files safely: checkpoints, key layouts and detection, textual-inversion
embeddings and model folders. Never unpickles code, never reads outside the paths given."""
