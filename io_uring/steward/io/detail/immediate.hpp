#pragma once
// Immediate completion for the io/ operations: an operation whose first system call already
// settles it (sent, written, received, or failed) completes without waiting for readiness.
//
// How the result reaches the caller depends on the completion token:
//  - asio::use_awaitable and asio::as_tuple(asio::use_awaitable): the initiating function returns
//    an awaitable that makes the first attempt when it is co_awaited and, when that settles the
//    operation, returns (or throws) at once: no handler, no executor round trip. The coroutine
//    frames are resumed by Asio's awaitable "pump" loop, not by nested calls, so a coroutine that
//    completes a million operations in a row does not grow the stack. Only when the attempt would
//    block does it co_await the composed operation that waits on the executor.
//  - every other token (callbacks, deferred, as_tuple(callback), bind_executor, ...): Asio's rule.
//    The handler is submitted with asio::dispatch on its associated immediate executor
//    (asio::associated_immediate_executor), which by default is the I/O executor with
//    blocking.never: a post, so the handler never runs inside the initiating function. A caller
//    who binds an immediate executor (asio::bind_immediate_executor) chooses otherwise, and then
//    owns the recursion that a loop of immediate completions can build.
//
// The operations are written as a class with three parts:
//   bool start()                 first attempt, inside the initiating call (or, for awaitables,
//                                when co_awaited); true when it settled the operation
//   result()                     std::tuple of the completion arguments once settled
//   operator()(Self&) / (Self&, std::error_code)
//                                the composed operation that waits for readiness and retries,
//                                used only when start() returned false

#include <asio/append.hpp>
#include <asio/as_tuple.hpp>
#include <asio/associated_immediate_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/awaitable.hpp>
#include <asio/compose.hpp>
#include <asio/dispatch.hpp>
#include <asio/system_error.hpp>
#include <asio/use_awaitable.hpp>

#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>

namespace steward::io::detail {

/// Which tokens take the awaitable fast path, and how a settled result becomes the awaitable's
/// value: use_awaitable throws on an error and yields the remaining arguments (one value, or a
/// tuple of several), exactly as Asio's awaitable handlers do.
template <typename Token>
struct awaitable_fast_path : std::false_type {};

template <typename Executor>
struct awaitable_fast_path<asio::use_awaitable_t<Executor>> : std::true_type {
    template <typename... Values>
    static auto deliver(std::tuple<std::error_code, Values...>&& result) {
        if (std::get<0>(result)) throw asio::system_error(std::get<0>(result));
        if constexpr (sizeof...(Values) == 1)
            return std::move(std::get<1>(result));
        else
            return std::apply(
                [](std::error_code, Values&&... v) { return std::tuple<Values...>(std::move(v)...); },
                std::move(result));
    }
};

template <typename Executor>
struct awaitable_fast_path<asio::as_tuple_t<asio::use_awaitable_t<Executor>>> : std::true_type {
    template <typename... Values>
    static auto deliver(std::tuple<std::error_code, Values...>&& result) {
        return std::move(result);
    }
};

template <typename Token>
inline constexpr bool is_awaitable_fast_path_v = awaitable_fast_path<std::decay_t<Token>>::value;

/// Hands a settled result to @p handler the way Asio's own operations do on immediate
/// completion: dispatch on the handler's associated immediate executor, whose default (the I/O
/// executor with blocking.never) posts.
template <typename Handler, typename IoExecutor, typename... Args>
void complete_immediately(Handler&& handler, const IoExecutor& io_ex, std::tuple<Args...>&& result) {
    auto immediate_ex = asio::get_associated_immediate_executor(handler, io_ex);
    std::apply(
        [&](Args&&... args) {
            asio::dispatch(immediate_ex, asio::append(std::forward<Handler>(handler), std::move(args)...));
        },
        std::move(result));
}

/// The initiation behind the non-awaitable tokens: first attempt, then either the immediate
/// completion above or the composed operation that waits.
template <typename Signature, typename IoObject>
class initiate_immediate_op {
public:
    using executor_type = typename IoObject::executor_type;

    explicit initiate_immediate_op(IoObject& io) noexcept : io_(io) {}
    [[nodiscard]] executor_type get_executor() const noexcept { return io_.get_executor(); }

    template <typename Handler, typename Op>
    void operator()(Handler&& handler, Op op) const {
        if (op.start()) {
            complete_immediately(std::forward<Handler>(handler), io_.get_executor(), op.result());
            return;
        }
        asio::async_compose<std::decay_t<Handler>, Signature>(std::move(op), handler, io_);
    }

private:
    IoObject& io_;
};

/// The awaitable behind use_awaitable / as_tuple(use_awaitable). A coroutine, so nothing happens
/// until it is co_awaited (as with Asio's own awaitable operations).
template <typename Token, typename Signature, typename IoObject, typename Op>
typename asio::async_result<Token, Signature>::return_type await_immediate_op(IoObject& io, Op op,
                                                                              Token token) {
    if (op.start()) co_return awaitable_fast_path<Token>::deliver(op.result());
    co_return co_await asio::async_compose<Token, Signature>(std::move(op), token, io);
}

/// Starts @p op for @p token: the awaitable fast path or the immediate-executor initiation.
template <typename Signature, typename CompletionToken, typename IoObject, typename Op>
auto start_immediate_op(IoObject& io, Op&& op, CompletionToken&& token) {
    if constexpr (is_awaitable_fast_path_v<CompletionToken>) {
        return await_immediate_op<std::decay_t<CompletionToken>, Signature>(
            io, std::forward<Op>(op), std::forward<CompletionToken>(token));
    } else {
        return asio::async_initiate<CompletionToken, Signature>(
            initiate_immediate_op<Signature, IoObject>(io), token, std::forward<Op>(op));
    }
}

}  // namespace steward::io::detail
