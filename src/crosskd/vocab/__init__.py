"""Teacher -> student vocabulary transfers. Importing the package registers the built-in ones (crosskd.vocab.transfer
has the interface and the registry)."""

from crosskd.vocab import (  # noqa: F401  (each registers its transfer)
    chunk_likelihood,
    first_token,
    projector,
    student_projection,
    uld,
)
