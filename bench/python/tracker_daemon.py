# CPython's own resource tracker daemon, reading the pipe read end inherited as descriptor
# sys.argv[1] (as CPython starts it: `from multiprocessing.resource_tracker import main; main(fd)`).
import sys

from multiprocessing.resource_tracker import main

main(int(sys.argv[1]))
