"""girder-cellrcnn: the Girder plugin of cellrcnn for the Digital Slide Archive (no torch, no cellrcnn library)."""

from setuptools import setup

setup(
    name='girder-cellrcnn',
    version='0.1.0',
    description='cellrcnn results on Girder items and folders, and folder-wide CellDetection runs, for the '
                'Digital Slide Archive',
    license='Apache 2.0',
    packages=['girder_cellrcnn'],
    python_requires='>=3.10',
    install_requires=['cachetools', 'girder>=3.2,<5', 'girder-jobs', 'girder-large-image',
                      'girder-large-image-annotation', 'girder-slicer-cli-web'],
    entry_points={'girder.plugin': ['cellrcnn = girder_cellrcnn:CellRCNNPlugin']},
)
