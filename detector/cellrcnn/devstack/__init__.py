"""Development stacks: a throwaway Girder with the DSA plugins (``local_girder``) and the whole DSA loop on this
machine (``local_dsa``), for ``cellrcnn detect --local-girder``, ``cellrcnn dsa`` and the tests. Not part of the
whole-slide pipeline: nothing in it is imported by the stages."""

import os

#: the checkout this package runs from (``.venv-girder``, ``plugin/`` and the Dockerfile live there)
CHECKOUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..'))
