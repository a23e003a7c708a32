from setuptools import find_packages, setup

setup(
    name='cellrcnn',
    version='0.1.0',
    description='GPU Faster R-CNN cell detection for whole-slide images (Digital Slide Archive plugin)',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    # the library's folder is its import name: detector/cellrcnn is `import cellrcnn`
    packages=find_packages('detector'),
    package_dir={'': 'detector'},
    package_data={'cellrcnn': ['models/*.pt', 'models/*.md', 'data/*']},
    # histomicstk itself is installed by install.sh with --no-deps (its declared requirements pull GDAL);
    # the block below is what it needs to import, as the DSA's own images install it.
    install_requires=[
        'numpy',
        'scipy',
        # torch.load(weights_only=True) can be made to run a crafted file's code before 2.6 (checkpoint.SAFE_TORCH)
        'torch>=2.6',
        'torchvision',
        'large-image[tiff,pil]',
        # the nuclei pixelmap's label image (cellrcnn.nuclei_pixelmap)
        'tifffile',
        'pyvips',
        'pyvips-binary',
        'opencv-python-headless',
        'scikit-image',
        'pycocotools',
        'tqdm',
        # histomicstk's needs
        'girder-client',
        'nimfa',
        'pandas',
        'scikit-learn',
        'imageio',
        'shapely',
        'sqlalchemy',
        'matplotlib',
        'dask[dataframe]<2024.11.0',
        'distributed',
        'girder-slicer-cli-web',
        'ctk-cli',
    ],
    extras_require={
        # ruff is pinned: its rule set changes between versions, and CI must not fail on a new release's rules
        'test': ['pytest', 'ruff==0.17.6'],
        'girder': ['girder-client'],
        # the browser tests of the local DSA (tests/test_histomicsui.py); they drive Debian's Chromium
        'dsa': ['playwright'],
    },
    entry_points={'console_scripts': ['cellrcnn = cellrcnn.__main__:main']},
)
