# What the install tests (run.cmake, user_warnings.cmake) share: a step that must succeed.

# Runs the command in ARGN; stops the test with its output when it fails. The step's standard
# output is left in last_output for the caller to check.
function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc}):\n${out}\n${err}")
  endif()
  message(STATUS "${what}: ok")
  set(last_output "${out}" PARENT_SCOPE)
endfunction()
