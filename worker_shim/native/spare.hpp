// The zygote's spare: a worker forked ahead of the next fork request, waiting with nothing of
// its own written (worker_shim/molt_shim/zygote.py, class Spare, has the why).
#pragma once

#include <Python.h>

namespace molt::native {

// fork_spare(sock, zygote_end, channel, master, comm) -> int | (bytes, [fd, fd, fd])
//
// In the zygote: PyOS_BeforeFork(), fork() an intermediate, PyOS_AfterFork_Parent(); returns
// the intermediate's pid (OSError when the fork failed). The intermediate forks the spare,
// sends `SPARE_PID=<pid>` on `channel` (to the master) and the pid alone on `sock` (for the
// zygote to read when it next needs it), and _exit()s. The spare runs no Python until it is
// used: it closes `zygote_end` (the zygote's end of the pair, so that the zygote's death reads
// as EOF here), puts /dev/null on the zygote's `channel` fd number (the number stays taken),
// names itself `comm`, waits to be `master`'s child (the subreaper's, once the intermediate
// is gone), sets the parent-death signal and blocks on `sock`. When the zygote sends it a
// fork request (the packet, the worker's fds as SCM_RIGHTS) it closes `sock`, runs
// PyOS_AfterFork_Child() and returns (packet, fds): from there on it is exactly a child of
// os.fork(). EOF, an error, or not being adopted: _exit(0), Python never runs again.
PyObject* fork_spare(PyObject* module, PyObject* args);

}  // namespace molt::native
