"""Metadata lives in setup.cfg. The region-decoding extension is optional: without a compiler
or libjpeg-turbo's headers (Debian: libjpeg62-turbo-dev) the package installs without it and
decodes whole images instead."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("fastlmdb.core._jpegcrop",
                  ["fastlmdb/core/_jpegcrop.c", "fastlmdb/core/_resize.c"],
                  depends=["fastlmdb/core/_resize.h"], libraries=["jpeg", "m"],
                  optional=True, extra_compile_args=["-O3", "-pthread"],
                  extra_link_args=["-pthread"]),
    ],
)
