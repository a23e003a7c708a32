"""The ``cellrcnn`` command: detect, batch, train, train-girder, evaluate, synth, dsa. The parser is
:mod:`cellrcnn.command_line`; what each command does, :mod:`cellrcnn.commands`."""

import sys

from .command_line import build_parser, token_from_file
from .errors import histomicstk, run_reporting_errors

#: the commands that need histomicstk (tissue detection, stain augmentation): they check it before any work
NEEDS_HISTOMICSTK = ('detect', 'batch', 'train', 'train-girder')


def main(argv=None):
    args = build_parser().parse_args(argv)

    def run():
        if args.command in NEEDS_HISTOMICSTK:
            histomicstk()
        if getattr(args, 'girder_token_file', None):
            args.girder_token = token_from_file(args.girder_token_file)
        args.run(args)

    return run_reporting_errors('cellrcnn', run)


if __name__ == '__main__':
    sys.exit(main())
