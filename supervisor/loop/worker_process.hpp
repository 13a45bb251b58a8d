// One worker process as the loop sees it: its channel and its output pipes.
#pragma once

#include <sys/types.h>
#include <uv.h>

#include <string>
#include <string_view>

#include "supervisor/core/supervisor.hpp"
#include "supervisor/os/os.hpp"

namespace molt::loop {

class Master;

struct WorkerProcess {
    Master* master = nullptr;
    core::GenerationId generation = 0;
    int slot = 0;
    pid_t pid = 0;
    bool zygote = false;   // its generation's zygote: its channel carries FORK/FORKED
    bool standby = false;  // the standby (standby.cpp): in no generation until START=
    os::Fd channel_fd;     // the master's end; libuv only polls it
    uv_poll_t channel{};
    uv_pipe_t out{};
    uv_pipe_t err{};
    std::string out_partial;
    std::string err_partial;
    std::string stderr_tail;  // the last few KiB, for failure reports
    int open_handles = 0;

    int out_fd() const { return fd_of(&out); }
    int err_fd() const { return fd_of(&err); }
    static int fd_of(const uv_pipe_t* pipe) {
        uv_os_fd_t fd = -1;
        uv_fileno(reinterpret_cast<const uv_handle_t*>(pipe), &fd);
        return fd;
    }

    void line(bool is_err, std::string_view text);
    // Splits output into lines, each logged with the worker's generation and slot.
    void consume(bool is_err, const char* data, std::size_t size);
    // After the process exited, whatever is still in the pipes is read at once, so that the
    // failure report has the worker's last words.
    void drain_output();
};

// Stops watching its channel and pipes; the WorkerProcess deletes itself once libuv has closed
// them.
void close_worker_handles(WorkerProcess* worker);

}  // namespace molt::loop
