"""The task image's pins (image-constraints.txt): every requirement of the project is pinned to one version, and
torch and torchvision are not (they come unpinned from the registry). tests/test_dsa.py checks the built image."""
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from support import image_pins


def test_every_requirement_of_the_image_is_pinned_but_torch():
    pins = image_pins()
    needed = {'histomicstk'}  # install.sh installs it with --no-deps
    for text in metadata.requires('cellrcnn'):
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({'extra': 'test'}):  # ./install.sh: .[test]
            needed.add(canonicalize_name(requirement.name))
    unpinned = {'torch', 'torchvision'}
    assert needed - unpinned - set(pins) == set()
    assert unpinned & set(pins) == set()
