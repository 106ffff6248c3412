#include "tracker/daemon.hpp"

#include "tracker/cleanup.hpp"

#include <steward/error.hpp>
#include <steward/io_uring_check.hpp>

#include <asio/buffer.hpp>
#include <asio/io_context.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/steady_timer.hpp>

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <exception>
#include <memory>
#include <thread>

namespace steward::detail::tracking {
namespace {

constexpr std::string_view prefix = "steward-tracker: ";
constexpr std::size_t read_chunk = 256 * 1024;
// A deeper pipe lets writers run ahead while the daemon processes a chunk, so each read returns
// more messages and the two sides switch less often. Raising it is best effort: the limit is
// /proc/sys/fs/pipe-max-size (1 MiB by default) and the call fails on anything but a pipe.
constexpr int wanted_pipe_size = 1024 * 1024;
constexpr std::size_t flush_threshold = 64 * 1024;
// After a read that returned less than gather_below bytes, the daemon lets writers fill the pipe
// for gather_pause before it reads again. Waking for every few messages costs the writers more
// than the messages themselves (on 2 cores each wake-up preempts or migrates a writer), and
// nothing in the daemon is urgent: it acts on the registrations only at end of input. A larger
// read (batched writers: a group commit writes 4 KiB at a time) is followed at once by the next.
constexpr std::size_t gather_below = 4 * 1024;
constexpr auto gather_pause = std::chrono::microseconds(200);
// How long a new name may wait for its identity lookup while reads keep filling the buffer.
constexpr auto identity_delay = std::chrono::milliseconds(50);
// From this many new shared memory/semaphore names on, one listing of /dev/shm replaces the lstats.
constexpr std::size_t scan_threshold = 64;

void write_all(int fd, std::string_view bytes) noexcept {
    while (!bytes.empty()) {
        const ssize_t n = ::write(fd, bytes.data(), bytes.size());
        if (n < 0) {
            if (errno == EINTR) continue;
            return;  // nowhere left to complain to (stderr closed or a broken pipe)
        }
        bytes.remove_prefix(static_cast<std::size_t>(n));
    }
}

void append_errno(std::string& out, const std::error_code& ec) {
    // CPython's OSError text: "[Errno 2] No such file or directory".
    out += "[Errno ";
    out += std::to_string(ec.value());
    out += "] ";
    out += ec.message();
}

bool valid_utf8_at(std::string_view s, std::size_t i, std::size_t& len) noexcept {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0xc2 && c <= 0xdf)
        len = 2;
    else if (c >= 0xe0 && c <= 0xef)
        len = 3;
    else if (c >= 0xf0 && c <= 0xf4)
        len = 4;
    else
        return false;
    if (i + len > s.size()) return false;
    for (std::size_t k = 1; k < len; ++k)
        if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80) return false;
    return true;
}

}  // namespace

void append_quoted(std::string& out, std::string_view bytes) {
    static constexpr char hex[] = "0123456789abcdef";
    out += '\'';
    for (std::size_t i = 0; i < bytes.size(); ++i) {
        const auto c = static_cast<unsigned char>(bytes[i]);
        std::size_t len = 0;
        if (c == '\\' || c == '\'') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c == '\n') {
            out += "\\n";
        } else if (c == '\r') {
            out += "\\r";
        } else if (c == '\t') {
            out += "\\t";
        } else if (c >= 0x20 && c < 0x7f) {
            out += static_cast<char>(c);
        } else if (c >= 0x80 && valid_utf8_at(bytes, i, len)) {
            out.append(bytes.substr(i, len));
            i += len - 1;
        } else {
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    out += '\'';
}

daemon_core::daemon_core(int report_fd) : report_fd_(report_fd) {}

void daemon_core::ingest(std::string_view chunk) {
    splitter_.feed(
        chunk, [this](std::string_view line) { on_line(line); },
        [this](decode_error error) { on_bad_line(error, {}); });
}

void daemon_core::on_line(std::string_view line) {
    ++messages_;
    decoded_message msg;
    if (const auto error = decode_line(line, msg, scratch_); error != decode_error::none) {
        on_bad_line(error, line);
        return;
    }
    switch (msg.cmd) {
        case command::register_resource:
            try {
                const auto [handle, fresh] = registry_.insert(msg.type, msg.name);
                // A repeated REGISTER is about the object under the name now (it may have been
                // unlinked and created again by the family since), so its identity is looked up again.
                if (fresh || registry_.renew_identity(handle)) {
                    if (pending_identity_.empty()) pending_since_ = std::chrono::steady_clock::now();
                    pending_identity_.push_back(handle);
                }
            } catch (const std::exception& e) {
                // Out of memory: this name cannot be tracked, but everything else still can, and the
                // family is still alive — stopping now would remove resources still in use.
                ++untracked_;
                output_ += prefix;
                output_ += "cannot track ";
                append_quoted(output_, msg.name);
                output_ += ": ";
                output_ += e.what();
                output_ += '\n';
            }
            break;
        case command::unregister_resource:
            if (!registry_.erase(msg.type, msg.name)) {
                ++malformed_;
                output_ += prefix;
                output_ += "ignoring UNREGISTER of a ";
                output_ += to_string(msg.type);
                output_ += " name that is not registered: ";
                append_quoted(output_, msg.name);
                output_ += '\n';
            }
            break;
        case command::probe:
            break;
    }
}

void daemon_core::on_bad_line(decode_error error, std::string_view line) {
    ++malformed_;
    output_ += prefix;
    output_ += "ignoring malformed message (";
    output_ += describe(error);
    output_ += ')';
    if (!line.empty()) {
        if (line.back() == '\n') line.remove_suffix(1);
        output_ += ": ";
        append_quoted(output_, line.substr(0, 120));
        if (line.size() > 120) output_ += "...";
    }
    output_ += '\n';
    if (output_.size() > flush_threshold) flush();
}

void daemon_core::resolve_identities() {
    // Many new shared memory or semaphore names at once: one listing of /dev/shm answers for all
    // of them (identity from the directory entry, absence from not being listed), far cheaper
    // than one lstat each. The listing is bounded so a crowded /dev/shm does not make it worse.
    std::size_t shm_like = 0;
    for (const auto handle : pending_identity_) {
        if (!registry_.live(handle) || !registry_.identity_pending(handle)) continue;
        const auto type = registry_.type(handle);
        shm_like += type == resource_type::shared_memory || type == resource_type::semaphore;
    }
    bool scanned = false;
    if (shm_like >= scan_threshold) {
        scanned = scan_shm_directory(
            shm_like * 8 + 1024, [this](resource_type type, std::string_view name, const file_identity& id) {
                const auto handle = registry_.find(type, name);
                if (handle != registry::no_handle && registry_.identity_pending(handle))
                    registry_.set_identity(handle, &id);
            });
    }
    for (const auto handle : pending_identity_) {
        if (!registry_.live(handle) || !registry_.identity_pending(handle)) continue;
        const auto type = registry_.type(handle);
        if (scanned && (type == resource_type::shared_memory || type == resource_type::semaphore)) {
            registry_.set_identity(handle, nullptr);  // not in /dev/shm: does not exist (yet)
            continue;
        }
        std::error_code ec;
        const auto id = lookup_identity(type, registry_.name(handle), ec);
        registry_.set_identity(handle, id ? &*id : nullptr);
    }
    pending_identity_.clear();
    if (pending_identity_.capacity() > 65536) pending_identity_.shrink_to_fit();
}

void daemon_core::end_of_batch(bool input_drained) {
    if (!pending_identity_.empty() &&
        (input_drained || std::chrono::steady_clock::now() - pending_since_ >= identity_delay))
        resolve_identities();
    // Compaction renumbers entries, so only when no lookup is waiting on a handle.
    if (pending_identity_.empty()) registry_.compact();
    flush();
}

void daemon_core::flush() {
    write_all(report_fd_, output_);
    output_.clear();
}

void daemon_core::observe_dev_shm() {
    // Many shared memory segments or semaphores left: one listing of /dev/shm tells which still
    // exist and whether each is the registered object, so cleanup needs one unlink per existing
    // object and nothing for the ones already gone. Only a complete listing proves absence.
    const std::size_t count =
        registry_.size(resource_type::shared_memory) + registry_.size(resource_type::semaphore);
    if (count < scan_threshold) return;
    const bool complete = scan_shm_directory(
        count * 8 + 1024, [this](resource_type type, std::string_view name, const file_identity& id) {
            const auto handle = registry_.find(type, name);
            if (handle == registry::no_handle) return;
            const auto expected = registry_.identity(handle);
            registry_.observe(handle, !expected || *expected == id ? registry::observation::same_object
                                                                   : registry::observation::other_object);
        });
    if (!complete) return;
    registry_.for_each([this](registry::handle h) {
        const auto type = registry_.type(h);
        if ((type == resource_type::shared_memory || type == resource_type::semaphore) &&
            registry_.observed(h) == registry::observation::unknown)
            registry_.observe(h, registry::observation::absent);
    });
}

int daemon_core::finish() {
    splitter_.finish([this](decode_error error) { on_bad_line(error, {}); });
    pending_identity_.clear();
    flush();
    bool leaked = false;
    bool failed = false;
    const auto on_failure = [&](std::string_view what, std::error_code ec) {
        failed = true;
        output_ += prefix;
        append_quoted(output_, what);
        output_ += ": ";
        append_errno(output_, ec);
        output_ += '\n';
    };
    observe_dev_shm();
    for (const auto type : {resource_type::shared_memory, resource_type::semaphore, resource_type::file,
                            resource_type::directory}) {
        const std::size_t count = registry_.size(type);
        if (count == 0) continue;
        leaked = true;
        // CPython's wording, so log searches written for resource_tracker keep matching.
        output_ += prefix;
        output_ += "There appear to be ";
        output_ += std::to_string(count);
        output_ += " leaked ";
        output_ += to_string(type);
        output_ += " objects to clean up at shutdown: {";
        bool first = true;
        registry_.for_each([&](registry::handle h) {
            if (registry_.type(h) != type) return;
            if (!first) output_ += ", ";
            first = false;
            append_quoted(output_, registry_.name(h));
        });
        output_ += "}\n";
        flush();
        registry_.for_each([&](registry::handle h) {
            if (registry_.type(h) != type) return;
            const auto name = registry_.name(h);
            cleanup_result result;
            switch (registry_.observed(h)) {
                case registry::observation::absent:
                    result = cleanup_result::already_gone;
                    break;
                case registry::observation::other_object:
                    result = cleanup_result::replaced;
                    break;
                case registry::observation::same_object:
                    // Already compared through the listing: unlink without another lookup.
                    result = remove_resource(type, name, std::nullopt, on_failure);
                    break;
                default:
                    result = remove_resource(type, name, registry_.identity(h), on_failure);
                    break;
            }
            if (result == cleanup_result::replaced) {
                output_ += prefix;
                append_quoted(output_, name);
                output_ +=
                    ": left alone: the name now refers to a different object than the one registered\n";
            }
            if (output_.size() > flush_threshold) flush();
        });
        flush();
    }
    if (failed || untracked_ != 0) return exit_cleanup_failed;
    if (malformed_ != 0) return exit_malformed_input;
    return leaked ? exit_leaks_cleaned : exit_clean;
}

namespace {

// One read outstanding at a time: the next read is only submitted once the previous chunk is fully
// processed, so everything the daemon has consumed from the pipe has also been acted on.
class pipe_reader {
public:
    pipe_reader(asio::io_context& ctx, unique_fd fd, daemon_core& core)
        : descriptor_(ctx, fd.release()),
          gather_timer_(ctx),
          core_(core),
          buffer_(std::make_unique<char[]>(read_chunk)) {}

    void start() {
        descriptor_.async_read_some(asio::buffer(buffer_.get(), read_chunk),
                                    [this](const std::error_code& ec, std::size_t n) { on_read(ec, n); });
    }

private:
    void on_read(const std::error_code& ec, std::size_t n) {
        if (n != 0) core_.ingest({buffer_.get(), n});
        core_.end_of_batch(n < read_chunk);
        if (!ec && n < gather_below) {
            gather_timer_.expires_after(gather_pause);
            gather_timer_.async_wait([this](const std::error_code&) { start(); });
        } else if (!ec) {
            start();
        } else if (ec == asio::error::interrupted || ec == asio::error::try_again) {
            start();
        } else if (ec != asio::error::eof) {
            // Any other read error ends the input like EOF does: cleaning up is the safe choice,
            // exactly what CPython's tracker does when its read loop raises.
            std::string msg(prefix);
            msg += "reading the pipe failed (" + ec.message() + "); treating it as end of input\n";
            write_all(STDERR_FILENO, msg);
        }
    }

    asio::posix::stream_descriptor descriptor_;
    asio::steady_timer gather_timer_;
    daemon_core& core_;
    std::unique_ptr<char[]> buffer_;
};

void blocking_loop(int fd, daemon_core& core) {
    const auto buffer = std::make_unique<char[]>(read_chunk);
    for (;;) {
        const ssize_t n = ::read(fd, buffer.get(), read_chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
            // A descriptor someone made non-blocking: wait for data instead of mistaking "nothing
            // yet" for the end of the family.
            pollfd p{fd, POLLIN, 0};
            (void)::poll(&p, 1, -1);
            continue;
        }
        if (n <= 0) {
            if (n < 0) {
                std::string msg(prefix);
                msg += "reading the pipe failed (" + errno_code(errno).message() +
                       "); treating it as end of input\n";
                write_all(STDERR_FILENO, msg);
            }
            return;
        }
        core.ingest({buffer.get(), static_cast<std::size_t>(n)});
        core.end_of_batch(static_cast<std::size_t>(n) < read_chunk);
        if (static_cast<std::size_t>(n) < gather_below) std::this_thread::sleep_for(gather_pause);
    }
}

}  // namespace

int run_daemon(unique_fd fd, bool allow_io_uring) {
    // The daemon is the only reader: a non-blocking read end (a careless spawner) is made blocking,
    // as io_uring reads and the fallback loop both expect.
    if (const int fl = ::fcntl(fd.get(), F_GETFL); fl >= 0 && (fl & O_NONBLOCK))
        (void)::fcntl(fd.get(), F_SETFL, fl & ~O_NONBLOCK);
    if (::fcntl(fd.get(), F_GETPIPE_SZ) < wanted_pipe_size)
        (void)::fcntl(fd.get(), F_SETPIPE_SZ, wanted_pipe_size);
    daemon_core core(STDERR_FILENO);
    std::error_code probe;
    std::string why;
    if (allow_io_uring) check_io_uring(probe, &why);
    if (allow_io_uring && !probe) {
        asio::io_context ctx(1);
        pipe_reader reader(ctx, std::move(fd), core);
        reader.start();
        ctx.run();
    } else {
        if (allow_io_uring) {
            std::string msg(prefix);
            msg += "io_uring unavailable (" + why + "); reading with blocking read() instead\n";
            write_all(STDERR_FILENO, msg);
        }
        blocking_loop(fd.get(), core);
    }
    return core.finish();
}

}  // namespace steward::detail::tracking
