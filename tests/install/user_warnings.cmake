# The user-warnings stage: compiles, against a real `cmake --install` of this build, one
# translation unit per public header, every example, the README's code and every options struct
# (tests/install/warnings/) with mp's include directory as an ordinary -I path and
# -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Werror, with the compiler MP_CXX. A warning in
# mp's headers fails it, as it would fail a user's -Werror build.
# Inputs: MP_BINARY_DIR, MP_WORK_DIR, MP_SOURCE_DIR, MP_CXX, MP_HAVE_MPI, MP_CXX_LAUNCHER (the
# build's compiler launcher, e.g. ccache: a warning fails the compile, so nothing that warns is
# ever cached).
file(REMOVE_RECURSE "${MP_WORK_DIR}")

include(${CMAKE_CURRENT_LIST_DIR}/common.cmake)

set(prefix "${MP_WORK_DIR}/prefix")
set(build "${MP_WORK_DIR}/build")
run_step("install" ${CMAKE_COMMAND} --install "${MP_BINARY_DIR}" --prefix "${prefix}")
set(launcher "")
if(MP_CXX_LAUNCHER)
  set(launcher "-DCMAKE_CXX_COMPILER_LAUNCHER=${MP_CXX_LAUNCHER}")
endif()
run_step("configure (${MP_CXX})" ${CMAKE_COMMAND} -G "Unix Makefiles" ${launcher}
         -S "${MP_SOURCE_DIR}/tests/install/warnings" -B "${build}"
         "-DCMAKE_PREFIX_PATH=${prefix}" "-DCMAKE_CXX_COMPILER=${MP_CXX}"
         "-DMP_EXAMPLES_DIR=${MP_SOURCE_DIR}/examples" "-DMP_README=${MP_SOURCE_DIR}/README.md"
         "-DMP_CONSUMER_MPI=${MP_HAVE_MPI}")

# The point of the stage: mp's headers reach the compiler as -I, not -isystem.
file(READ "${build}/compile_commands.json" commands)
string(FIND "${commands}" "-isystem ${prefix}/include" system_at)
string(FIND "${commands}" "-I${prefix}/include" plain_at)
if(NOT system_at EQUAL -1)
  message(FATAL_ERROR "mp's headers are included as system headers (-isystem): their warnings would be hidden")
endif()
if(plain_at EQUAL -1)
  message(FATAL_ERROR "mp's include directory is not on the compile lines:\n${commands}")
endif()

# -k: every translation unit that warns is reported, not only the first.
run_step("compile with strict warnings (${MP_CXX})" ${CMAKE_COMMAND} --build "${build}"
         --parallel 2 -- -k)
file(REMOVE_RECURSE "${MP_WORK_DIR}")
