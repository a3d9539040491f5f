/* exec storm generator for bench/exec_storm.py.
 *
 *   storm PROGRAM COUNT CONCURRENCY [literal]
 *
 * fork()s COUNT children, each execve()s PROGRAM with argv {PROGRAM, "exec-storm", "<i>"}
 * and an empty environment ("literal": "exec-storm" is a string literal, see below); at most CONCURRENCY children are alive at once (the parent
 * reaps one with wait() before it forks another). Prints one line on stdout:
 *
 *   pid=<own pid> launched=<forks> failed=<children that did not exit 0> wall_s=<seconds>
 *   cpu_s=<seconds>
 *
 * wall_s covers the first fork to the last wait (CLOCK_MONOTONIC): the storm itself,
 * not this program's start-up. cpu_s is the user+system time of this process and its
 * reaped children (getrusage); time spent in BPF programs run by their syscalls and
 * tracepoints is system time of the task that hit them, so it shows up here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long reap(long *failed)
{
    int status;
    pid_t p;
    do {
        p = wait(&status);
    } while (p < 0 && errno == EINTR);
    if (p < 0)
        return -1;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        (*failed)++;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 4 && !(argc == 5 && strcmp(argv[4], "literal") == 0)) {
        fprintf(stderr, "usage: %s PROGRAM COUNT CONCURRENCY [literal]\n", argv[0]);
        return 2;
    }
    char *program = argv[1];
    long count = atol(argv[2]);
    long concurrency = atol(argv[3]);
    if (count < 0 || concurrency < 1) {
        fprintf(stderr, "storm: bad COUNT or CONCURRENCY\n");
        return 2;
    }
    /* Every argument lives in memory the parent has written (its stack): a tracer reads
     * argv at sys_enter_execve with bpf_probe_read_user, which cannot fault pages in, and
     * fork() leaves file-backed pages such as string literals in .rodata unmapped in the
     * child until touched, so a literal argument would be unreadable there ("literal"
     * mode keeps it so, to show what a tracer does with such an argument). */
    char tag[] = "exec-storm";
    char index[32];
    char *child_argv[] = {program, argc == 5 ? "exec-storm" : tag, index, NULL};
    char *child_env[] = {NULL};
    long launched = 0, failed = 0, alive = 0;
    struct timespec t0, t1;

    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        while (alive >= concurrency) {
            if (reap(&failed) < 0)
                break;
            alive--;
        }
        snprintf(index, sizeof(index), "%ld", i);
        pid_t pid = fork();
        if (pid == 0) {
            execve(program, child_argv, child_env);
            _exit(127);
        }
        if (pid < 0) {
            failed++;
            continue;
        }
        launched++;
        alive++;
    }
    while (alive > 0 && reap(&failed) == 0)
        alive--;
    clock_gettime(CLOCK_MONOTONIC, &t1);

    double wall = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    double cpu = 0;
    struct rusage ru;
    int who[] = {RUSAGE_SELF, RUSAGE_CHILDREN};
    for (int w = 0; w < 2; w++) {
        if (getrusage(who[w], &ru) == 0)
            cpu += (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec)
                   + (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    }
    printf("pid=%d launched=%ld failed=%ld wall_s=%.6f cpu_s=%.6f\n", (int)getpid(), launched,
           failed, wall, cpu);
    return 0;
}
