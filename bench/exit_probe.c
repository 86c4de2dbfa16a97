/* LD_PRELOAD probe for bench/stress_exit.py (which compiles and preloads it with --probe):
 *
 *  - on SIGABRT, prints the aborting thread's backtrace and the names of the process's threads to
 *    stderr, then aborts as before (signal 6). Symbols are mangled: pipe them through c++filt;
 *  - with EXIT_PROBE_GLOO_DELAY_MS=N, a gloo worker thread sleeps a random 0..N ms each time it has
 *    woken waiters (pthread_cond_broadcast: a finished collective's future), as if descheduled on
 *    a busy machine: it then releases the collective's tensors (taking the GIL to drop their
 *    Python objects) after the main thread has moved on, maybe as far as the interpreter's exit,
 *    where Python ends a thread that waits for the GIL (pthread_exit) and the unwinding through a
 *    C++ destructor is std::terminate ("terminate called without an active exception").
 *
 *   gcc -shared -fPIC -O1 -o exit_probe.so bench/exit_probe.c -ldl
 *
 * Not async-signal-safe (backtrace_symbols_fd, opendir): good enough for a process about to die. */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <execinfo.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static void say(const char *text) { (void)!write(2, text, strlen(text)); }

static int in_gloo_worker(void) {
    char name[17] = {0};
    prctl(PR_GET_NAME, name);
    return strncmp(name, "pt_gloo_runloop", 15) == 0;
}

static void on_abort(int sig) {
    char line[512];
    void *frames[128];
    snprintf(line, sizeof line, "\n=== exit_probe: SIGABRT in pid %d, thread %ld ===\n",
             (int)getpid(), (long)syscall(SYS_gettid));
    say(line);
    backtrace_symbols_fd(frames, backtrace(frames, 128), 2);
    say("=== exit_probe: threads (tid name) ===\n");
    DIR *tasks = opendir("/proc/self/task");
    struct dirent *entry;
    while (tasks && (entry = readdir(tasks))) {
        if (entry->d_name[0] == '.') continue;
        char path[300], name[64] = "?";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", entry->d_name);
        int fd = open(path, O_RDONLY);
        if (fd >= 0) {
            ssize_t n = read(fd, name, sizeof name - 1);
            name[n > 0 ? n : 0] = 0;
            if (n > 0 && name[n - 1] == '\n') name[n - 1] = 0;
            close(fd);
        }
        snprintf(line, sizeof line, "  %s %s\n", entry->d_name, name);
        say(line);
    }
    if (tasks) closedir(tasks);
    say("=== exit_probe: end ===\n");
    signal(sig, SIG_DFL);
    raise(sig);
}

static long delay_ms;

__attribute__((constructor)) static void install(void) {
    void *warm[1];
    backtrace(warm, 1);  /* loads libgcc_s now, not inside the handler */
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_abort;
    sigaction(SIGABRT, &action, NULL);
    const char *delay = getenv("EXIT_PROBE_GLOO_DELAY_MS");
    delay_ms = delay ? atol(delay) : 0;
}

int pthread_cond_broadcast(pthread_cond_t *cond) {
    static int (*real)(pthread_cond_t *);
    if (!real) real = (int (*)(pthread_cond_t *))dlsym(RTLD_NEXT, "pthread_cond_broadcast");
    int result = real(cond);
    if (delay_ms > 0 && in_gloo_worker()) {
        static __thread unsigned seed;
        if (!seed) seed = (unsigned)syscall(SYS_gettid) ^ (unsigned)getpid() << 16;
        usleep((useconds_t)(rand_r(&seed) % (delay_ms * 1000 + 1)));
    }
    return result;
}
